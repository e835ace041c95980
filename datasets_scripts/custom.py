"""Bring your own images: an image folder + a CSV or JSONL of (reference, text, target) -> the project schema.

    python -m datasets_scripts.custom --data_dir my_images --annotations pairs.csv --output_dir my-cir-hf

Annotation columns: `reference`, `text` (or `modification_text`), `target` (empty for queries without a
known target), optional `split` (`train`/`val`/`test`, default `--split`). Image names are file names relative
to `--data_dir`, with or without extension. The corpus of a split is every image its triplets use, plus, with
`--all_images_in_corpus`, every image of the folder (a larger gallery of distractors).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from .common import (
    IMAGE_EXTENSIONS,
    SPLITS,
    AnnotationError,
    SplitData,
    check_images,
    counts_table,
    resolve_inside,
    write_cir_dataset,
)


def _records(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"Annotation file {path} not found.")
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    if path.suffix in (".jsonl", ".json"):
        records = []
        with open(path) as f:
            for line_number, line in enumerate(f):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise AnnotationError(f"{path}: malformed JSON on line {line_number + 1}: {error.msg}.") from error
        return records
    raise ValueError(f"{path}: annotations must be .csv or .jsonl.")


def _image_path(data_dir: Path, name: str, source: str) -> Path:
    path = resolve_inside(data_dir, name, source)
    if path.suffix.lower() in IMAGE_EXTENSIONS or path.exists():
        return path
    for ext in IMAGE_EXTENSIONS:
        if path.with_name(path.name + ext).exists():
            return path.with_name(path.name + ext)
    return path


def build_custom(
    data_dir: str | Path,
    annotations: str | Path,
    output_dir: str | Path,
    split: str = "train",
    all_images_in_corpus: bool = False,
    skip_missing_images: bool = False,
) -> Path:
    data_dir, annotations = Path(data_dir), Path(annotations)
    splits: dict[str, SplitData] = {}
    for index, record in enumerate(_records(annotations)):
        if not isinstance(record, dict):
            raise AnnotationError(f"{annotations}: record {index} is not an object.")
        text = record.get("text") or record.get("modification_text")
        for name, value in (("reference", record.get("reference")), ("text", text)):
            if not value:
                raise AnnotationError(f"{annotations}: record {index} has no field {name!r}.")
        record_split = record.get("split") or split
        if record_split not in SPLITS:
            raise AnnotationError(f"{annotations}: record {index} split {record_split!r} is not one of {SPLITS}.")
        data = splits.setdefault(record_split, SplitData())
        target = record.get("target") or None
        data.triplets.append({
            "reference_id": str(record["reference"]),
            "target_id": str(target) if target is not None else None,
            "modification_texts": [text],
            "source": "annotated",
        })
    folder_images = []
    if all_images_in_corpus:
        folder_images = sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    for name, data in splits.items():
        ids = [t["reference_id"] for t in data.triplets] + [t["target_id"] for t in data.triplets if t["target_id"]]
        paths = {i: _image_path(data_dir, i, f"{annotations} image {i!r}") for i in dict.fromkeys(ids)}
        for image in folder_images:
            path = data_dir / image
            if path not in paths.values():
                paths[image] = path
        data.corpus = [{"image_id": i, "path": p} for i, p in paths.items()]
    check_images(splits, skip_missing_images, str(data_dir))
    print(counts_table(splits))
    card = f"# Custom CIR data in the spn4cir schema\n\nConverted with `python -m datasets_scripts.custom` from " \
           f"`{annotations.name}`.\n\n{counts_table(splits)}"
    return write_cir_dataset(output_dir, splits, card=card)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="folder with the images")
    parser.add_argument("--annotations", required=True, help=".csv or .jsonl with reference, text, target")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--split", default="train", choices=SPLITS, help="split of records without a 'split' column")
    parser.add_argument("--all_images_in_corpus", action="store_true")
    parser.add_argument("--skip_missing_images", action="store_true")
    args = parser.parse_args(argv)
    out = build_custom(args.data_dir, args.annotations, args.output_dir, args.split, args.all_images_in_corpus,
                       args.skip_missing_images)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
