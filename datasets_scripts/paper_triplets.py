"""The SPN authors' released positive-scaling data -> the project schema.

SPN4CIR ships its generated triplets as `extend` files that only its own `data_utils.py` reads, and its
de-duplication as `optimized_images.json`:

- FashionIQ `captions/cap.extend_<backbone>[_llm].train.json`: records `{"candidate", "target", "captions":
  [texts], "caption1", "caption2"[, "llm_caption"]}`;
- CIRR `cirr/captions/cap.rc2.train.extend_<backbone>[_llm].json`: records `{"reference", "target_hard",
  "caption": text or [texts], "pairid": 0, "img_set": {"members": ["xxx"]}, "caption1", "caption2"[, "llm_caption"]}`
  (the pair id and members are placeholders, dropped here);
- `optimized_images.json`: `[imagenames, imagepaths, imagename2id]`, every train image name -> the index of its
  group's kept name.

`--plus` (`<backbone>/data_utils.py`, `CIRDataset.__init__`) appends the extend records after the annotated
train triplets; `--llmcap` replaces their texts by the Llama rewrite: `[llm_caption]`, except BLIP4CIR / SPRC on
CIRR, which keep the second template beside it (`[llm_caption, caption[1]]`) and read the plain file, where
CLIP4CIR / TG-CIR read the `_llm` file. During training an extend triplet's text is `random.choice` of its list
(never FashionIQ's caption join: `index >= self.N`), which is the project's `source="generated"` rule.

`convert_extend_file` writes the records as a scaled-triplets dataset (`triplets` split `train`, exactly the
extend rows in file order; `corpus` = the images they use, copied from the benchmark's train corpus), so
`examples/run_cir.py --extra_triplets DIR` trains on the rows the original trains on with `--plus`.
`read_dedup_map` turns `optimized_images.json` into the `{duplicate id: canonical id}` map of
`datasets_scripts.dedup` (`run_cir.py --dedup_map FILE`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import datasets

from modeling_spn4cir.families import family_of_release_folder
from modeling_spn4cir.image_store import ImageStore

from .common import AnnotationError, SplitData, counts_table, read_json, require, write_cir_dataset

DATASETS = ("fashioniq", "cirr")
SHORT_NAME = {"fashioniq": "fiq", "cirr": "cirr"}
# Under --llmcap these backbones read the plain extend file (its `llm_caption` field), the others the `_llm` file.
LLM_IN_PLAIN_FILE = ("blip", "blip2")

_FIQ_NAME = re.compile(r"^cap\.extend_(?P<backbone>[A-Za-z0-9]+?)(?P<llm>_llm)?\.train\.json$")
_CIRR_NAME = re.compile(r"^cap\.rc2\.train\.extend_(?P<backbone>[A-Za-z0-9]+?)(?P<llm>_llm)?\.json$")

TRIPLET_EXTRA = {
    "backbone": datasets.Value("string"),
    "family": datasets.Value("string"),
    "llm": datasets.Value("bool"),
    "reference_caption": datasets.Value("string"),
    "target_caption": datasets.Value("string"),
    "llm_caption": datasets.Value("string"),
}


@dataclass(frozen=True)
class ExtendFile:
    """An extend file and what its name says: the benchmark, the backbone folder that reads it, the `_llm` suffix."""

    path: Path
    dataset: str
    backbone: str
    llm_file: bool

    @property
    def family(self) -> str | None:
        """The family the backbone folder trains (the one whose spec names it as its release folder), or None."""
        spec = family_of_release_folder(self.backbone)
        return spec.name if spec is not None else None

    def variants(self) -> list[bool]:
        """The `llm` flags under which the original reads this file: the plain file without `--llmcap` (and,
        for BLIP4CIR / SPRC, with it); the `_llm` file only with `--llmcap`."""
        if self.llm_file:
            return [True]
        return [False, True] if self.backbone in LLM_IN_PLAIN_FILE else [False]

    def dataset_name(self, llm: bool) -> str:
        """`spn4cir-fiq-scaled-triplets-clip`, `spn4cir-cirr-scaled-triplets-blip2-llm`, ..."""
        return f"spn4cir-{SHORT_NAME[self.dataset]}-scaled-triplets-{self.backbone}{'-llm' if llm else ''}"


def parse_extend_name(path: str | Path) -> ExtendFile | None:
    """The `ExtendFile` a file name denotes, or None when it is not an extend file name."""
    path = Path(path)
    for dataset, pattern in (("fashioniq", _FIQ_NAME), ("cirr", _CIRR_NAME)):
        match = pattern.match(path.name)
        if match:
            return ExtendFile(path, dataset, match["backbone"], bool(match["llm"]))
    return None


def _texts(record: dict, extend: ExtendFile, llm: bool, index: int) -> list[str]:
    path = extend.path
    if extend.dataset == "fashioniq":
        texts = record["captions"]
    else:
        texts = [record["caption"]] if isinstance(record["caption"], str) else record["caption"]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        field = "captions" if extend.dataset == "fashioniq" else "caption"
        raise AnnotationError(f"{path}: record {index} field {field!r} must be a string or a non-empty list of "
                              "strings.")
    if not llm:
        return list(texts)
    require(record, ["llm_caption"], path, index, {"llm_caption": str})
    if extend.dataset == "cirr" and extend.backbone in LLM_IN_PLAIN_FILE:
        if len(texts) < 2:
            raise AnnotationError(f"{path}: record {index}: --llmcap for {extend.backbone} on CIRR keeps caption[1], "
                                  f"but 'caption' has {len(texts)} entry.")
        return [record["llm_caption"], texts[1]]
    return [record["llm_caption"]]


def read_extend_triplets(extend: ExtendFile, llm: bool = False, corpus_ids=None) -> list[dict]:
    """The rows (project schema, `source="generated"`) the original appends to the train triplets with `--plus`
    (`llm`: and `--llmcap`), in file order. With `corpus_ids`, every reference and target must be one of them."""
    records = read_json(extend.path)
    if not isinstance(records, list):
        raise AnnotationError(f"{extend.path}: expected a JSON list of triplet records.")
    fashioniq = extend.dataset == "fashioniq"
    reference_key, target_key = ("candidate", "target") if fashioniq else ("reference", "target_hard")
    text_key = "captions" if fashioniq else "caption"
    known = None if corpus_ids is None else set(corpus_ids)
    rows = []
    for index, record in enumerate(records):
        require(record, [reference_key, target_key, text_key], extend.path, index,
                {reference_key: str, target_key: str})
        for role, key in (("reference", reference_key), ("target", target_key)):
            if known is not None and record[key] not in known:
                raise AnnotationError(
                    f"{extend.path}: record {index} {role} {record[key]!r} is not in the benchmark's train corpus; "
                    "the extend files pair train images only: check that the benchmark directory is the one the "
                    "file was generated for (and complete, see --skip_missing_images).")
        rows.append({
            "reference_id": record[reference_key],
            "target_id": record[target_key],
            "modification_texts": _texts(record, extend, llm, index),
            "source": "generated",
            "backbone": extend.backbone,
            "family": extend.family,
            "llm": llm,
            "reference_caption": record.get("caption1"),
            "target_caption": record.get("caption2"),
            "llm_caption": record.get("llm_caption"),
        })
    return rows


def convert_extend_file(extend: ExtendFile | str | Path, output_dir: str | Path, corpus, llm: bool = False,
                        overwrite: bool = False) -> Path:
    """Write the extend file as a scaled-triplets dataset directory.

    Args:
        extend: the file (its name must follow SPN's pattern) or its `ExtendFile`.
        corpus: the benchmark's train corpus (HF dataset with `image_id`, `image`): ids are checked against it and
            the images the triplets use are copied into the output's `corpus` config.
        llm: the `--llmcap` texts instead of the templates.
        overwrite: replace a previous output of this converter at `output_dir`.
    """
    if not isinstance(extend, ExtendFile):
        parsed = parse_extend_name(extend)
        if parsed is None:
            raise ValueError(f"{extend}: not an SPN extend file name (cap.extend_<backbone>[_llm].train.json or "
                             "cap.rc2.train.extend_<backbone>[_llm].json).")
        extend = parsed
    if llm not in extend.variants():
        raise ValueError(f"{extend.path}: the original reads this file only with llm={extend.variants()}.")
    triplets = read_extend_triplets(extend, llm, corpus["image_id"])
    images = ImageStore(corpus)
    category = dict(zip(corpus["image_id"], corpus["category"])) if "category" in corpus.column_names else {}
    corpus_rows = []
    for image_id in dict.fromkeys(i for t in triplets for i in (t["reference_id"], t["target_id"])):
        data, name = images.raw(image_id)
        corpus_rows.append({"image_id": image_id, "image_bytes": data, "image_name": name and Path(name).name,
                            "category": category.get(image_id)})
    split = {"train": SplitData(corpus=corpus_rows, triplets=triplets)}
    family = extend.family or "an unknown backbone folder"
    texts = ("`[llm_caption]`" if extend.dataset == "fashioniq" or extend.backbone not in LLM_IN_PLAIN_FILE
             else "`[llm_caption, caption[1]]`") if llm else "the file's template texts"
    card = f"""# SPN4CIR generated triplets: {extend.dataset}, `{extend.backbone}`{' (LLM texts)' if llm else ''}

The positive-scaling triplets the SPN authors released (`BUAADreamer/SPN4CIR`, `{extend.path.name}`), read by
`{extend.backbone}` ({family}) with `--plus`{' --llmcap' if llm else ''}. Converted by
`datasets_scripts.paper_triplets`: one row per record in file order, `source` = "generated",
`backbone` = "{extend.backbone}", `family` = "{family}", `llm` = {llm}; `modification_texts` = {texts} (one is
picked at random per step, as the original); `reference_caption` / `target_caption` = the LLaVA captions
(`caption1` / `caption2`). The corpus holds the benchmark's train images these triplets use.

Train with the annotated triplets (the original's `--plus`):
`python examples/run_cir.py ... --dataset {extend.dataset} --extra_triplets <this dataset>`.

{counts_table(split)}"""
    return write_cir_dataset(output_dir, split, corpus_extra={"category": datasets.Value("string")},
                             triplet_extra=TRIPLET_EXTRA, card=card, tool="datasets_scripts.paper_triplets",
                             overwrite=overwrite, protect=[extend.path])


def read_dedup_map(path: str | Path, corpus_ids=None) -> dict[str, str]:
    """`optimized_images.json` (`[imagenames, imagepaths, imagename2id]`) -> `{duplicate id: canonical id}`: each
    name whose group keeps another name maps to it (the kept name is the group's first image, the same rule as
    `datasets_scripts.dedup`). With `corpus_ids`, every name must be one of them."""
    path = Path(path)
    data = read_json(path)
    if (not isinstance(data, list) or len(data) != 3 or not isinstance(data[0], list)
            or not isinstance(data[2], dict)):
        raise AnnotationError(f"{path}: expected SPN's [imagenames, imagepaths, imagename2id] (zscir/"
                              "deduplicate_images.py).")
    names, name_to_group = data[0], data[2]
    known = None if corpus_ids is None else set(corpus_ids)
    mapping = {}
    for name, group in name_to_group.items():
        if not isinstance(group, int) or not 0 <= group < len(names):
            raise AnnotationError(f"{path}: image {name!r} maps to group {group!r}, outside imagenames "
                                  f"(0..{len(names) - 1}).")
        if known is not None and name not in known:
            raise AnnotationError(f"{path}: image {name!r} is not in the benchmark's train corpus; check that the "
                                  "benchmark directory is the one the map was computed for.")
        if names[group] != name:
            mapping[name] = names[group]
    return mapping


def guess_dedup_dataset(path: str | Path) -> str | None:
    """The benchmark an `optimized_images.json` belongs to: from its folder names (`fashionIQ_dataset`,
    `cirr_dataset`, `fiq`, `cirr`), else from its image paths; None when neither tells."""
    path = Path(path)
    for part in reversed(path.parent.parts):
        dataset = _dataset_of(part)
        if dataset:
            return dataset
    data = read_json(path)
    if isinstance(data, list) and len(data) == 3 and isinstance(data[1], list) and data[1]:
        return _dataset_of(str(Path(str(data[1][0])).parent))
    return None


def _dataset_of(text: str) -> str | None:
    words = set(re.split(r"[^a-z0-9]+", text.lower()))
    if words & {"fiq", "fashioniq", "fashion"} or "fashioniq" in text.lower():
        return "fashioniq"
    if "cirr" in words or "cirr_dataset" in text.lower():
        return "cirr"
    return None
