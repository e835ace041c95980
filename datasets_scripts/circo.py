"""CIRCO (Baldrati et al., ICCV 2023) from its official layout to an HF dataset in the project schema.

    python -m datasets_scripts.circo --data_dir CIRCO --output_dir circo-hf [--skip_missing_images]

Layout: `annotations/{val,test}.json` (records `id`, `reference_img_id`, `target_img_id`, `gt_img_ids`,
`relative_caption`, `shared_concept`, `semantic_aspects`; test has only `id`, `reference_img_id`,
`relative_caption`, `shared_concept`), gallery = the COCO 2017 unlabeled images `unlabeled2017/<12-digit id>.jpg`.
Ids become strings without padding (`"85932"`). val and test share one gallery, stored once. `target_img_id` (the
image the caption was written for: the authors' Recall@K) is kept as `target_id`, `semantic_aspects` as they are
(None where a record has none).
"""

from __future__ import annotations

from pathlib import Path

import datasets

from modeling_spn4cir.cli import run_cli
from modeling_spn4cir.storage import check_output_dir

from .common import (
    AnnotationError,
    SplitData,
    converter_main,
    counts_table,
    read_records,
    require,
    resolve_inside,
    select_splits,
    write_cir_dataset,
)
from .image_checks import bad_images_error, find_bad_images

CIRCO_SPLITS = ("val", "test")
TOOL = "datasets_scripts.circo"


def _gallery(data_dir: Path) -> list[dict]:
    directory = data_dir / "unlabeled2017"
    if not directory.is_dir():
        raise FileNotFoundError(f"COCO unlabeled2017 images not found at {directory}; download COCO 2017 unlabeled.")
    rows = []
    for path in sorted(directory.glob("*.jpg")):
        if not (path.stem.isascii() and path.stem.isdigit()):
            raise AnnotationError(f"{path}: expected a COCO file name of digits (e.g. 000000085932.jpg).")
        # a symbolic link leaving the gallery directory is refused (the converted dataset may be published)
        rows.append({"image_id": str(int(path.stem)), "path": resolve_inside(directory, path.name, str(path))})
    if not rows:
        raise FileNotFoundError(f"No COCO images (*.jpg) in {directory}; download COCO 2017 unlabeled.")
    return rows


def _coco_id(value, path: Path, index: int, name: str) -> str:
    """A COCO image id (an int, or a string of digits) as the unpadded string the gallery uses."""
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isascii() and value.isdigit())):
        raise AnnotationError(f"{path}: record {index} field {name!r} is {value!r:.80}, expected a COCO image id "
                              "(an integer such as 85932); fix the record.")
    return str(int(value))


def _read_split(data_dir: Path, split: str, gallery: list[dict], skip_missing_images: bool,
                bad: set[str] = frozenset()) -> SplitData:
    path = data_dir / "annotations" / f"{split}.json"
    records = read_records(path)
    known = {row["image_id"] for row in gallery}
    fields = ["id", "reference_img_id", "relative_caption", "shared_concept"]
    if split == "val":
        fields += ["target_img_id", "gt_img_ids"]
    data = SplitData(corpus=gallery)
    for index, record in enumerate(records):
        require(record, fields, path, index, {"relative_caption": str, "shared_concept": str, "gt_img_ids": list})
        _coco_id(record["id"], path, index, "id")
        reference = _coco_id(record["reference_img_id"], path, index, "reference_img_id")
        gts = [_coco_id(g, path, index, "gt_img_ids") for g in record.get("gt_img_ids") or []]
        target = _coco_id(record["target_img_id"], path, index, "target_img_id") if split == "val" else None
        if split == "val" and not gts:
            raise AnnotationError(f"{path}: record {index} field 'gt_img_ids' is empty; a val query needs its "
                                  "ground truths.")
        aspects = record.get("semantic_aspects")
        if aspects is not None and (not isinstance(aspects, list) or not all(isinstance(a, str) for a in aspects)):
            raise AnnotationError(f"{path}: record {index} field 'semantic_aspects' is {aspects!r:.80}, expected a "
                                  "list of strings (e.g. [\"cardinality\"]); fix the record.")
        needed = list(dict.fromkeys([reference] + ([target] if target else []) + gts))
        if any(i in bad for i in needed):  # images that do not decode, left out with --skip_bad_images
            data.skipped_triplets += 1
            continue
        absent = [i for i in needed if i not in known]
        if absent and skip_missing_images:
            data.missing_images += [i for i in absent if i not in data.missing_images]
            data.skipped_triplets += 1
            continue
        if absent:
            raise FileNotFoundError(
                f"{path}: record {index} needs image {int(absent[0]):012d}.jpg, not found in {data_dir / 'unlabeled2017'}"
                "; restore it or pass --skip_missing_images to drop such queries (counted in the card)."
            )
        data.triplets.append({
            "reference_id": reference,
            "target_id": target,
            "target_ids": gts or None,
            "modification_texts": [record["relative_caption"]],
            "shared_concept": record["shared_concept"],
            "semantic_aspects": aspects,
            "query_id": str(record["id"]),
            "source": "annotated",
        })
    return data


def build_circo(data_dir: str | Path, output_dir: str | Path, splits=None, skip_missing_images: bool = False,
                skip_bad_images: bool = False, overwrite_output_dir: bool = False) -> Path:
    """Convert CIRCO under `data_dir` into `output_dir`; the gallery is written once, for the first split.
    `output_dir` must be new, empty, or (with `overwrite_output_dir`) a previous CIRCO conversion, and outside
    `data_dir`."""
    data_dir = Path(data_dir)
    check_output_dir(output_dir, TOOL, overwrite_output_dir, [data_dir])  # before the work, not after it
    gallery = _gallery(data_dir)
    problems = find_bad_images(row["path"] for row in gallery)
    if problems and not skip_bad_images:
        raise bad_images_error(problems)
    bad = [row["image_id"] for row in gallery if row["path"] in problems]
    if bad:
        gallery = [row for row in gallery if row["path"] not in problems]
        print(f"{len(bad)} gallery images do not decode, left out (--skip_bad_images): {bad[:20]}"
              f"{' ...' if len(bad) > 20 else ''}")
    names = select_splits(splits, CIRCO_SPLITS)
    chosen = {s: _read_split(data_dir, s, gallery, skip_missing_images, set(bad)) for s in names}
    if bad:
        chosen[names[0]].bad_images = bad
    shared = {s: names[0] for s in names[1:]}
    print(counts_table(chosen, shared))
    card = f"""# CIRCO in the spn4cir schema

Converted with `python -m datasets_scripts.circo` (annotations from miccunifi/CIRCO; gallery: COCO 2017
unlabeled images, CC BY 4.0 per COCO's terms). `target_ids` = `gt_img_ids` (multi-target), `target_id` =
`target_img_id`, `modification_texts` = [relative_caption], `shared_concept` and `semantic_aspects` as annotated,
`query_id` = `id`. val and test share the gallery files.

{counts_table(chosen, shared)}"""
    return write_cir_dataset(
        output_dir, chosen,
        triplet_extra={
            "target_ids": datasets.List(datasets.Value("string")),
            "shared_concept": datasets.Value("string"),
            "semantic_aspects": datasets.List(datasets.Value("string")),
            "query_id": datasets.Value("string"),
        },
        card=card,
        shared_corpus=shared, tool=TOOL, overwrite=overwrite_output_dir, protect=[data_dir],
    )


def main(argv=None):
    converter_main(build_circo, __doc__, CIRCO_SPLITS, argv)


if __name__ == "__main__":
    run_cli(main)
