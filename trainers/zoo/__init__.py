"""The SPN authors' Hub release (`BUAADreamer/SPN4CIR`) -> a model zoo and datasets that load in one line.

`build_zoo(snapshot_dir, output_dir)` walks a local snapshot of the release and classifies every file by its
content:

- a checkpoint (a torch zip archive or pickle) whose keys one of the families' converters recognizes
  (`FamilySpec.checkpoint_prefixes`) is converted into `models/spn4cir-<family>-<fiq|cirr>[-stage1]/`
  (weights, config, code, processor, and a card with the paper's reported metrics as `model-index` entries, the
  conversion provenance and the evaluation protocol). The stage comes from the checkpoint's format, the benchmark
  from its path (`data/clip4cir/fiq_stage1.pt`, `checkpoints/cirr_blip2/best.pt`): the weights cannot tell it;
- an extend file (`cap.extend_<backbone>[_llm].train.json`, `cap.rc2.train.extend_<backbone>[_llm].json`) becomes
  `datasets/spn4cir-<fiq|cirr>-scaled-triplets-<backbone>[-llm]/` (`datasets_scripts.paper_triplets`) when the
  benchmark's images are given, and `optimized_images.json` becomes `dedup_maps/<benchmark>.json` (also copied into
  that benchmark's datasets as `dedup_map.json`);
- everything else is listed in the report (`conversion_report.json`) as not converted (with the reason: LLaVA
  captions, a Combiner alone, a duplicate, ...) or unrecognized: no file is skipped silently. Hidden folders
  (`.cache/huggingface` of `snapshot_download(local_dir=...)`) are not part of the release and are not walked.

With the benchmarks (`fashioniq_dir`, `cirr_dir`: the official layout or a converted directory) every converted
model is also evaluated on the val split (`CIREvaluator`) and the measured metrics go into its card beside the
reported ones. `push_zoo` publishes the models and datasets with an `HfApi`.

The room: `release` (classifying the files), `convert` (`build_zoo`), `cards` (the model cards), `paper` (the
paper's facts, from the family specs), `hub` (download and publish).
"""

from .cards import model_card
from .convert import benchmark_dirs, build_zoo
from .hub import push_zoo, snapshot
from .paper import SOURCE_REPO, reported_metrics, reported_protocol
from .release import Entry, ZooReport

__all__ = ["SOURCE_REPO", "Entry", "ZooReport", "benchmark_dirs", "build_zoo", "model_card", "push_zoo",
           "reported_metrics", "reported_protocol", "snapshot"]
