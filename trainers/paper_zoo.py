"""The SPN authors' Hub release (`BUAADreamer/SPN4CIR`) -> a model zoo and datasets that load in one line.

`build_zoo(snapshot_dir, output_dir)` walks a local snapshot of the release and classifies every file by its
content:

- a checkpoint (a torch zip archive or pickle) whose keys one of the families' converters recognizes
  (`modeling_spn4cir.convert_original_checkpoint`) is converted into `models/spn4cir-<family>-<fiq|cirr>[-stage1]/`
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
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from datasets_scripts.load import load_cir_data
from datasets_scripts.paper_triplets import (
    BACKBONE_FAMILY,
    SHORT_NAME,
    convert_extend_file,
    guess_dedup_dataset,
    parse_extend_name,
    read_dedup_map,
)
from modeling_spn4cir.storage import OutputDirError, atomic_write_bytes, atomic_write_json, file_sha256
from modeling_spn4cir.convert_original_checkpoint import FAMILIES, family_from_checkpoint

from .evaluation import CIREvaluator

PAPER = ("Feng et al., Improving Composed Image Retrieval via Contrastive Learning with Scaling Positives and "
         "Negatives (ACM MM 2024)")
PAPER_URL = "https://arxiv.org/abs/2404.11317"
SOURCE_REPO = "BUAADreamer/SPN4CIR"
TOKENIZERS = {"clip4cir": "openai/clip-vit-base-patch32", "tgcir": "openai/clip-vit-base-patch16",
              "blip4cir": "bert-base-uncased", "sprc": "bert-base-uncased"}
# The paper's base-method name, backbone and the authors' code folder of each family.
FAMILY_INFO = {
    "clip4cir": ("CLIP4CIR", "OpenAI CLIP RN50x4 (288 px), sum fusion", "clip"),
    "tgcir": ("TG-CIR", "OpenAI CLIP ViT-B/16", "tgcir"),
    "blip4cir": ("BLIP4CIR+Bi", "BLIP base (model_base.pth)", "blip"),
    "sprc": ("SPRC", "BLIP-2 (LAVIS blip2_cir_align_prompt, EVA ViT-g)", "blip2"),
}
# SPN's stage-2 tau (README train commands); BLIP4CIR and SPRC read theirs from the checkpoint.
TEMPERATURE = {("clip4cir", "fashioniq"): 0.02, ("clip4cir", "cirr"): 0.02,
               ("tgcir", "fashioniq"): 0.02, ("tgcir", "cirr"): 0.01}

_FIQ_KEYS = ("dress_recall@10", "dress_recall@50", "shirt_recall@10", "shirt_recall@50", "toptee_recall@10",
             "toptee_recall@50", "average_recall@10", "average_recall@50", "average")
_CIRR_KEYS = ("recall@1", "recall@5", "recall@10", "recall@50", "recall_subset@1", "recall_subset@2",
              "recall_subset@3", "average")
# The paper's Table 2 (FashionIQ val) and Table 3 (CIRR test, evaluation server), in %: stage 2 = the "+SPN" row,
# stage 1 = the base method's row (see REPORTED_NOTE). SPRC's base Avg R@10 is printed as 54.92 but is 54.72 by
# its own categories and Rmean; the printed value is kept, as reported.
REPORTED = {
    ("tgcir", "fashioniq", 2): (36.84, 60.83, 41.85, 63.89, 45.59, 68.79, 41.43, 64.50, 52.97),
    ("clip4cir", "fashioniq", 2): (38.82, 62.92, 45.83, 66.44, 48.80, 71.29, 44.48, 66.88, 55.68),
    ("blip4cir", "fashioniq", 2): (44.52, 67.13, 45.68, 67.96, 50.74, 73.79, 46.98, 69.63, 58.30),
    ("sprc", "fashioniq", 2): (50.57, 74.12, 57.70, 75.27, 60.84, 79.96, 56.37, 76.45, 66.41),
    ("tgcir", "fashioniq", 1): (35.55, 59.44, 40.24, 62.37, 43.65, 67.36, 39.81, 63.06, 51.44),
    ("clip4cir", "fashioniq", 1): (38.18, 62.67, 44.01, 64.57, 45.39, 69.56, 42.52, 65.60, 54.06),
    ("blip4cir", "fashioniq", 1): (44.22, 67.08, 45.00, 66.68, 49.72, 73.02, 46.31, 68.93, 57.62),
    ("sprc", "fashioniq", 1): (49.18, 72.43, 55.64, 73.89, 59.35, 78.58, 54.92, 74.97, 64.85),
    ("tgcir", "cirr", 2): (47.28, 79.13, 87.98, 97.54, 75.40, 89.78, 95.21, 77.27),
    ("clip4cir", "cirr", 2): (45.33, 78.07, 87.61, 98.17, 73.93, 89.28, 95.61, 76.00),
    ("blip4cir", "cirr", 2): (46.43, 77.64, 87.01, 97.06, 75.74, 90.07, 95.83, 76.69),
    ("sprc", "cirr", 2): (55.06, 83.83, 90.87, 98.29, 81.54, 92.65, 97.04, 82.69),
    ("tgcir", "cirr", 1): (45.23, 78.34, 87.13, 97.30, 72.84, 89.25, 95.13, 75.59),
    ("clip4cir", "cirr", 1): (42.80, 75.88, 86.26, 97.64, 70.00, 87.45, 94.99, 72.94),
    ("blip4cir", "cirr", 1): (44.77, 76.55, 86.41, 97.18, 74.99, 89.90, 95.59, 75.77),
    ("sprc", "cirr", 1): (51.96, 82.12, 89.74, 97.69, 80.65, 92.31, 96.60, 81.39),
}
REPORTED_NOTE = {
    2: "the paper's \"{method} +SPN\" row: this checkpoint's results as reported by the SPN authors, not re-measured",
    1: "the paper's \"{method}\" row: the base method as reported (its full pipeline, which may include a further "
       "stage such as a Combiner that this stage-1 checkpoint does not have), not re-measured",
}
BENCHMARK = {"fashioniq": ("FashionIQ", "fashioniq", "val", "Table 2"), "cirr": ("CIRR", "cirr", "test", "Table 3")}


def reported_metrics(family: str, dataset: str, stage: int) -> dict[str, float]:
    """The paper's numbers for a (family, benchmark, stage), keyed like `CIREvaluator`'s metrics."""
    values = REPORTED[(family, dataset, stage)]
    return dict(zip(_FIQ_KEYS if dataset == "fashioniq" else _CIRR_KEYS, values))


def remove_reference(family: str, dataset: str, stage: int) -> bool:
    """FashionIQ protocol of the reported numbers: SPN's CLIP4CIR code removes the reference from the ranking,
    every other code (CLIP4Cir's stage 1 included) keeps it."""
    return dataset == "fashioniq" and family == "clip4cir" and stage == 2


@dataclass
class Entry:
    """One file of the snapshot and what became of it."""

    path: str
    kind: str  # model | dataset | dedup_map | not_converted | unrecognized
    reason: str = ""
    outputs: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)


@dataclass
class ZooReport:
    entries: list[Entry] = field(default_factory=list)

    def of(self, kind: str) -> list[Entry]:
        return [e for e in self.entries if e.kind == kind]

    def to_json(self) -> dict:
        return {kind: [asdict(e) for e in self.of(kind)]
                for kind in ("model", "dataset", "dedup_map", "not_converted", "unrecognized")}

    def table(self) -> str:
        lines = ["| file | result | output / reason |", "|---|---|---|"]
        for e in self.entries:
            lines.append(f"| {e.path} | {e.kind} | {', '.join(e.outputs) or e.reason} |")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ classification
def _looks_like_checkpoint(path: Path) -> bool:
    """A torch zip archive or a pickle (protocol 2+), whatever the file is called."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _load_keys_only(path: Path) -> dict:
    """The checkpoint dict, memory-mapped where the format allows (reading the keys of a multi-GB file is cheap)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy (non-zip) files cannot be memory-mapped: the converters' reader explains failures
        from modeling_spn4cir.conversion_utils import load_checkpoint

        data = load_checkpoint(path)
    if not isinstance(data, dict):
        raise ValueError(f"holds a {type(data).__name__}, not a checkpoint dict")
    return data


def _dataset_from_path(relative: Path) -> str | None:
    for part in reversed(relative.with_suffix("").parts):
        words = set(re.split(r"[^a-z0-9]+", part.lower()))
        if words & {"fiq", "fashioniq"} or part.lower().startswith("fashioniq"):
            return "fashioniq"
        if "cirr" in words:
            return "cirr"
    return None


def _json_kind(path: Path) -> str | None:
    """What a JSON file of the release holds, by its records' keys (None: not one of the known kinds)."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    record = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else None
    if record is None:
        return None
    keys = set(record)
    if {"reference_name", "target_name", "captions"} <= keys:
        return "zero-shot CC3M triplets (their images are not part of the release); not converted"
    if {"candidate", "target", "captions"} <= keys or {"reference", "target_hard", "caption"} <= keys:
        return ("triplets in SPN's extend format, but the name does not say the backbone "
                "(cap.extend_<backbone>[_llm].train.json / cap.rc2.train.extend_<backbone>[_llm].json)")
    if {"image_id", "caption"} <= keys:
        return "image captions (LLaVA; the input of positive scaling, already inside the extend files); not converted"
    return None


# ------------------------------------------------------------------------------------------ model cards
def _eval_results(family, dataset, stage, measured):
    from huggingface_hub import EvalResult

    name, dataset_type, split, table = BENCHMARK[dataset]
    method = FAMILY_INFO[family][0]
    results = [
        EvalResult(task_type="image-retrieval", task_name="Composed image retrieval", dataset_type=dataset_type,
                   dataset_name=name, dataset_split=split, metric_type=key, metric_value=value,
                   metric_name=f"{key} (reported)", verified=False,
                   source_name=f"reported in the SPN paper, {table}, {REPORTED_NOTE[stage].format(method=method)}",
                   source_url=PAPER_URL)
        for key, value in reported_metrics(family, dataset, stage).items()
    ]
    if measured:
        results += [
            EvalResult(task_type="image-retrieval", task_name="Composed image retrieval", dataset_type=dataset_type,
                       dataset_name=name, dataset_split="val", metric_type=key, metric_value=round(float(value), 4),
                       metric_name=f"{key} (measured)", verified=False)
            for key, value in measured.items() if isinstance(value, (int, float))
        ]
    return results


def model_card(model_id: str, family: str, dataset: str, stage: int, source: Path, sha256: str, source_format: str,
               conversion_card: str, measured: dict | None = None, namespace: str | None = None) -> str:
    """The zoo card: YAML front matter with `model-index` (reported, and measured when given), then base model,
    training data, stage, provenance and protocol, then the family converter's own card."""
    from huggingface_hub import ModelCardData

    method, backbone, folder = FAMILY_INFO[family]
    name, _, split, table = BENCHMARK[dataset]
    short = SHORT_NAME[dataset]
    stage1_id = f"spn4cir-{family}-{short}-stage1"
    metadata = ModelCardData(
        model_name=model_id, library_name="transformers",
        tags=["composed-image-retrieval", "spn4cir", family, f"stage-{stage}"],
        base_model=f"{namespace}/{stage1_id}" if stage == 2 and namespace else None,
        eval_results=_eval_results(family, dataset, stage, measured),
    )
    if stage == 2:
        data = (f"{name} train triplets + the SPN generated triplets of `{folder}` (`--plus`, dataset "
                f"`spn4cir-{short}-scaled-triplets-{folder}`), candidate bank de-duplicated with "
                "`optimized_images.json`")
        base = f"`{stage1_id}` ({method} stage 1, released by its authors), {backbone}"
        stage_text = "2: SPN's candidate-bank stage (scaling negatives; image side frozen, query side trained)"
    else:
        data = f"{name} train triplets (annotated), trained by the {method} authors"
        base = backbone
        stage_text = f"1: the {method} authors' fine-tuning, the starting point of SPN's stage 2"
    removed = remove_reference(family, dataset, stage)
    protocol = (
        f"FashionIQ val, per-category gallery (`split.{{cat}}.val.json`), reference "
        f"{'removed from' if removed else 'kept in'} the ranking "
        f"({'SPN4CIR CLIP4CIR' if removed else 'CLIP4Cir / TG-CIR / BLIP4CIR / SPRC'} code); "
        "average = (mean R@10 + mean R@50) / 2"
        if dataset == "fashioniq" else
        "CIRR rc2: reported numbers are on test1 (evaluation server), measured ones on val; gallery = every image of "
        "the split, reference removed; subset = group members minus the reference; average = (R@5 + Rs@1) / 2"
    )
    measured_text = ("Measured metrics (val split of the local benchmark, `trainers.evaluation.CIREvaluator`, the "
                     "protocol above) are in the `model-index` next to the reported ones, labelled `(measured)`."
                     if measured else "Not re-measured here: the `model-index` holds the reported numbers only.")
    body = re.sub(r"^# ", "### ", re.sub(r"\A---\n.*?\n---\n", "", conversion_card, flags=re.S), flags=re.M)
    return f"""---
{metadata.to_yaml()}
---
# {model_id}

{method} {'+SPN ' if stage == 2 else ''}trained on {name}, converted from the SPN authors' release
(`{SOURCE_REPO}` on the Hub) into a `transformers` model. Paper: {PAPER} ({PAPER_URL}).

| field | value |
|---|---|
| base model | {base} |
| training data | {data} |
| stage | {stage_text} |
| reported metrics | {REPORTED_NOTE[stage].format(method=method)} ({table}; `model-index` entries `(reported)`) |
| evaluation protocol | {protocol} |
| source | `{SOURCE_REPO}`: `{source.as_posix()}`, sha256 `{sha256}`, format `{source_format}` |
| conversion | `python examples/convert_paper_checkpoints.py` (the `modeling_spn4cir.{family}` converter) |

{measured_text}

```python
import modeling_spn4cir  # or pass trust_remote_code=True
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained("<this repo>")
processor = AutoProcessor.from_pretrained("<this repo>")
```

## Conversion details
{body}"""


# ------------------------------------------------------------------------------------------ the zoo
@dataclass
class _Model:
    entry: Entry
    family: str
    dataset: str
    stage: int
    source_format: str
    source_path: Path
    directory: Path
    sha256: str
    conversion_card: str
    measured: dict | None = None


def snapshot(repo_id: str = SOURCE_REPO, local_dir: str | Path | None = None, revision: str | None = None) -> Path:
    """An existing copy of the release (`local_dir`), or `huggingface_hub.snapshot_download(repo_id)`."""
    if local_dir is not None:
        if not Path(local_dir).is_dir():
            raise FileNotFoundError(f"--local_dir {local_dir} is not a directory; pass a copy of {repo_id} (or leave "
                                    "it out to download one).")
        return Path(local_dir)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision))


def benchmark_dirs(data_dir=None, fashioniq_dir=None, cirr_dir=None) -> tuple[Path | None, Path | None]:
    """The FashionIQ and CIRR directories: explicit ones, else `data_dir/fashionIQ_dataset` and
    `data_dir/cirr_dataset` (SPN4CIR's layout) where they exist."""
    found = []
    for explicit, folder in ((fashioniq_dir, "fashionIQ_dataset"), (cirr_dir, "cirr_dataset")):
        if explicit is None and data_dir is not None and (Path(data_dir) / folder).is_dir():
            explicit = Path(data_dir) / folder
        found.append(Path(explicit) if explicit is not None else None)
    if data_dir is not None and found == [None, None]:
        raise FileNotFoundError(f"--data_dir {data_dir} has neither fashionIQ_dataset/ nor cirr_dataset/ (SPN4CIR's "
                                "layout); pass --fashioniq_dir / --cirr_dir instead.")
    return found[0], found[1]


def _benchmarks(fashioniq_dir, cirr_dir) -> dict:
    out = {}
    for dataset, directory in (("fashioniq", fashioniq_dir), ("cirr", cirr_dir)):
        if directory is not None:
            out[dataset] = load_cir_data(dataset, str(directory))
    return out


def _train_ids(data) -> list[str]:
    if "train" not in data.corpus:
        raise ValueError(f"The {data.name} benchmark at {data.path} has no train split; the generated triplets and "
                         "dedup maps are checked against (and take their images from) the train corpus.")
    return data.corpus["train"]["image_id"]


def _evaluate(model_dir: Path, family: str, dataset: str, stage: int, data, batch_size: int) -> dict:
    from modeling_spn4cir.loading import load_cir_model_and_processor

    model, processor = load_cir_model_and_processor(str(model_dir))
    evaluator = CIREvaluator(data.corpus["val"], data.triplets["val"], processor.image_processor, processor,
                             protocol=data.protocol, remove_reference=remove_reference(family, dataset, stage),
                             batch_size=batch_size, show_progress_bar=False)
    return evaluator(model)


def build_zoo(snapshot_dir: str | Path, output_dir: str | Path, fashioniq_dir: str | Path | None = None,
              cirr_dir: str | Path | None = None, tokenizers: dict[str, str | None] | None = None,
              namespace: str | None = None, eval_batch_size: int = 64, overwrite: bool = False) -> ZooReport:
    """Convert everything recognizable under `snapshot_dir` into `output_dir` (`models/`, `datasets/`, `dedup_maps/`,
    `conversion_report.json`).

    Args:
        fashioniq_dir, cirr_dir: the benchmarks (official layout or converted): needed for the generated-triplet
            datasets (ids checked, images copied) and to evaluate the models; without one, its extend files are
            listed as not converted and its models carry reported metrics only.
        tokenizers: family -> tokenizer to save with the processor (default `TOKENIZERS`; None: image processor only).
        namespace: Hub namespace the cards name for the stage-1 base of stage-2 models.
        overwrite: replace the outputs of a previous run (a directory holding anything else is never replaced).
    """
    snapshot_dir, output_dir = Path(snapshot_dir), Path(output_dir)
    if not snapshot_dir.is_dir():
        raise FileNotFoundError(f"{snapshot_dir} is not a directory; pass a snapshot of {SOURCE_REPO}.")
    tokenizers = {**TOKENIZERS, **(tokenizers or {})}
    benchmarks = _benchmarks(fashioniq_dir, cirr_dir)
    report = ZooReport()
    models: dict[tuple, list[_Model]] = {}  # (family, benchmark, stage) -> candidates in path order
    extends, dedups = [], []
    files = sorted(p for p in snapshot_dir.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(snapshot_dir).parts[:-1]))
    for path in files:
        relative = path.relative_to(snapshot_dir)
        entry = Entry(relative.as_posix(), "unrecognized")
        report.entries.append(entry)
        if path.name in (".gitattributes", "README.md", "LICENSE"):
            entry.kind, entry.reason = "not_converted", "repository metadata"
        elif parse_extend_name(path) is not None:
            extends.append((entry, parse_extend_name(path)))
        elif path.name == "optimized_images.json":
            dedups.append((entry, path))
        elif path.suffix == ".json":
            kind = _json_kind(path)
            entry.kind, entry.reason = ("not_converted", kind) if kind else ("unrecognized", "a JSON file of no "
                                                                               "known SPN4CIR format")
        elif _looks_like_checkpoint(path):
            _classify_checkpoint(path, relative, entry, models, output_dir)
        else:
            entry.reason = "neither a checkpoint (torch zip / pickle) nor a JSON file of SPN4CIR"

    converted = []
    for candidates in models.values():
        for model in candidates:
            if converted and converted[-1].directory == model.directory:
                model.entry.kind, model.entry.outputs = "not_converted", []
                model.entry.reason = (f"{model.family} {model.dataset} stage {model.stage} again: "
                                      f"{converted[-1].entry.path} was converted")
            elif _convert(model, tokenizers, benchmarks, eval_batch_size, overwrite):
                converted.append(model)
    for model in converted:
        card = model_card(model.directory.name, model.family, model.dataset, model.stage, Path(model.entry.path),
                          model.sha256, model.source_format, model.conversion_card, model.measured, namespace)
        atomic_write_bytes(model.directory / "README.md", card.encode())

    maps = {}
    for entry, path in dedups:
        dataset = guess_dedup_dataset(path)
        if dataset is None:
            entry.kind, entry.reason = "not_converted", "cannot tell whether it is FashionIQ's or CIRR's (folder name)"
            continue
        ids = _train_ids(benchmarks[dataset]) if dataset in benchmarks else None
        maps[dataset] = read_dedup_map(path, ids)
        out = atomic_write_json(output_dir / "dedup_maps" / f"{dataset}.json", maps[dataset], indent=1)
        entry.kind, entry.outputs = "dedup_map", [out.relative_to(output_dir).as_posix()]
        entry.details = {"dataset": dataset, "duplicates": len(maps[dataset]),
                         "checked_against_corpus": ids is not None}

    for entry, extend in extends:
        if extend.dataset not in benchmarks:
            entry.kind = "not_converted"
            entry.reason = (f"the {extend.dataset} benchmark is needed (its train images fill the dataset's corpus): "
                            f"pass --{'fashioniq' if extend.dataset == 'fashioniq' else 'cirr'}_dir or --data_dir")
            continue
        corpus = benchmarks[extend.dataset].corpus["train"]
        entry.kind = "dataset"
        for llm in extend.variants():
            out = convert_extend_file(extend, output_dir / "datasets" / extend.dataset_name(llm), corpus, llm,
                                      overwrite=overwrite)
            if extend.dataset in maps:
                atomic_write_json(out / "dedup_map.json", maps[extend.dataset], indent=1)
            entry.outputs.append(out.relative_to(output_dir).as_posix())
        entry.details = {"dataset": extend.dataset, "backbone": extend.backbone,
                         "family": BACKBONE_FAMILY.get(extend.backbone), "llm": extend.variants()}

    atomic_write_json(output_dir / "conversion_report.json", report.to_json(), indent=2)
    return report


def _classify_checkpoint(path: Path, relative: Path, entry: Entry, models: dict, output_dir: Path) -> None:
    try:
        family = family_from_checkpoint(_load_keys_only(path))
    except Exception as error:  # anything torch cannot read as a checkpoint dict is reported with its reason
        entry.reason = f"not a readable checkpoint dict: {error}"
        return
    if family is None:
        entry.reason = "a checkpoint whose keys match no supported family (clip4cir, tgcir, blip4cir, sprc)"
        return
    converter = importlib.import_module(FAMILIES[family][0])
    try:
        source_format = converter.read_original_checkpoint(path).source_format
    except ValueError as error:  # e.g. a CLIP4Cir Combiner alone: recognized, but no model by itself
        entry.kind, entry.reason = "not_converted", f"recognized as {family}, but not a model by itself: {error}"
        return
    stage = 2 if source_format == "spn4cir_stage2" else 1 if source_format.endswith("_stage1") else None
    dataset = _dataset_from_path(relative)
    if stage is None:
        entry.kind = "not_converted"
        entry.reason = f"{family} base weights ({source_format}), not a CIR checkpoint of the paper"
        return
    if dataset is None:
        entry.kind = "not_converted"
        entry.reason = f"{family} stage {stage}, but the path does not say FashionIQ (fiq) or CIRR (cirr)"
        return
    name = f"spn4cir-{family}-{SHORT_NAME[dataset]}{'-stage1' if stage == 1 else ''}"
    entry.kind, entry.outputs = "model", [f"models/{name}"]
    sha256 = file_sha256(path)
    entry.details = {"family": family, "dataset": dataset, "stage": stage, "source_format": source_format,
                     "sha256": sha256}
    models.setdefault((family, dataset, stage), []).append(
        _Model(entry, family, dataset, stage, source_format, path, output_dir / "models" / name, sha256, ""))


def _convert(model: _Model, tokenizers: dict, benchmarks: dict, eval_batch_size: int, overwrite: bool) -> bool:
    """Convert (and evaluate) one model; a checkpoint the converter rejects is reported, the others still convert."""
    converter = importlib.import_module(FAMILIES[model.family][0])
    kwargs = {}
    if (model.family, model.dataset) in TEMPERATURE:
        kwargs["temperature"] = TEMPERATURE[(model.family, model.dataset)]
    try:
        out = converter.convert_original_checkpoint(model.source_path, model.directory,
                                                    tokenizer=tokenizers.get(model.family),
                                                    overwrite_output_dir=overwrite, **kwargs)
    except OutputDirError:
        raise
    except (ValueError, KeyError) as error:  # CheckpointMismatchError and unreadable geometry name the keys
        model.entry.kind, model.entry.outputs = "not_converted", []
        model.entry.reason = f"recognized as {model.family} stage {model.stage}, but the conversion failed: {error}"
        return False
    model.conversion_card = (out / "README.md").read_text()
    if model.dataset in benchmarks and "val" not in benchmarks[model.dataset].triplets:
        model.entry.details["measured"] = f"not measured: the {model.dataset} benchmark has no val split"
    elif model.dataset in benchmarks:
        model.measured = _evaluate(out, model.family, model.dataset, model.stage, benchmarks[model.dataset],
                                   eval_batch_size)
        model.entry.details["measured"] = model.measured
    return True


def push_zoo(output_dir: str | Path, namespace: str, api=None, private: bool = False,
             token: str | None = None) -> list[str]:
    """Create `namespace/<name>` for every model and dataset directory under `output_dir` and upload it; returns the
    repo ids. `api`: an `HfApi` (or anything with its `create_repo` and `upload_folder`)."""
    from huggingface_hub import HfApi

    from datasets_scripts.publish import push_cir_dataset

    output_dir = Path(output_dir)
    api = api or HfApi(token=token)
    repos = []
    for directory in sorted((output_dir / "models").glob("*/")):
        repo_id = f"{namespace}/{directory.name}"
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(directory), repo_id=repo_id, repo_type="model", ignore_patterns=[".*"],
                          commit_message=f"Convert {directory.name} from {SOURCE_REPO}")
        repos.append(repo_id)
    for directory in sorted((output_dir / "datasets").glob("*/")):
        repo_id = f"{namespace}/{directory.name}"
        push_cir_dataset(directory, repo_id, private=private, api=api)
        repos.append(repo_id)
    return repos
