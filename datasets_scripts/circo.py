"""CIRCO (Baldrati et al., ICCV 2023) from its official layout to an HF dataset in the project schema.

    python -m datasets_scripts.circo --data_dir CIRCO --output_dir circo-hf [--skip_missing_images]

Layout: `annotations/{val,test}.json` (records `id`, `reference_img_id`, `target_img_id`, `gt_img_ids`,
`relative_caption`, `shared_concept`; test has only `id`, `reference_img_id`, `relative_caption`,
`shared_concept`), gallery = the COCO 2017 unlabeled images `unlabeled2017/<12-digit id>.jpg`. Ids become
strings without padding (`"85932"`). val and test share one gallery, stored once.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from .common import (
    AnnotationError,
    SplitData,
    converter_main,
    counts_table,
    read_json,
    require,
    select_splits,
    write_cir_dataset,
)

CIRCO_SPLITS = ("val", "test")


def _gallery(data_dir: Path) -> list[dict]:
    directory = data_dir / "unlabeled2017"
    if not directory.is_dir():
        raise FileNotFoundError(f"COCO unlabeled2017 images not found at {directory}; download COCO 2017 unlabeled.")
    rows = []
    for path in sorted(directory.glob("*.jpg")):
        if not path.stem.isdigit():
            raise AnnotationError(f"{path}: expected a COCO file name of digits (e.g. 000000085932.jpg).")
        rows.append({"image_id": str(int(path.stem)), "path": path})
    return rows


def _read_split(data_dir: Path, split: str, gallery: list[dict], skip_missing_images: bool) -> SplitData:
    path = data_dir / "annotations" / f"{split}.json"
    records = read_json(path)
    if not isinstance(records, list):
        raise AnnotationError(f"{path}: expected a JSON list of records.")
    known = {row["image_id"] for row in gallery}
    fields = ["id", "reference_img_id", "relative_caption", "shared_concept"]
    if split == "val":
        fields += ["target_img_id", "gt_img_ids"]
    data = SplitData(corpus=gallery)
    for index, record in enumerate(records):
        require(record, fields, path, index, {"relative_caption": str, "gt_img_ids": list})
        reference = str(record["reference_img_id"])
        gts = [str(g) for g in record.get("gt_img_ids") or []]
        target = str(record["target_img_id"]) if split == "val" else None
        absent = [i for i in [reference] + gts if i not in known]
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
            "query_id": str(record["id"]),
            "source": "annotated",
        })
    return data


def build_circo(data_dir: str | Path, output_dir: str | Path, splits=None, skip_missing_images: bool = False) -> Path:
    """Convert CIRCO under `data_dir` into `output_dir`; the gallery is written once, for the first split."""
    data_dir = Path(data_dir)
    gallery = _gallery(data_dir)
    names = select_splits(splits, CIRCO_SPLITS)
    chosen = {s: _read_split(data_dir, s, gallery, skip_missing_images) for s in names}
    shared = {s: names[0] for s in names[1:]}
    print(counts_table(chosen, shared))
    card = f"""# CIRCO in the spn4cir schema

Converted with `python -m datasets_scripts.circo` (annotations from miccunifi/CIRCO; gallery: COCO 2017
unlabeled images, CC BY 4.0 per COCO's terms). `target_ids` = `gt_img_ids` (multi-target), `modification_texts`
= [relative_caption], `query_id` = `id`. val and test share the gallery files.

{counts_table(chosen, shared)}"""
    return write_cir_dataset(
        output_dir, chosen,
        triplet_extra={
            "target_ids": datasets.List(datasets.Value("string")),
            "shared_concept": datasets.Value("string"),
            "query_id": datasets.Value("string"),
        },
        card=card,
        shared_corpus=shared,
    )


def main(argv=None):
    converter_main(build_circo, __doc__, CIRCO_SPLITS, argv)


if __name__ == "__main__":
    main()
