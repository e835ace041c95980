"""Bring your own images: an image folder + a CSV or JSONL of (reference, text, target) -> the project schema.

    python -m datasets_scripts.custom --data_dir my_images --annotations pairs.csv --output_dir my-cir-hf

Annotation columns: `reference`, `text` (or `modification_text`), `target` (empty for queries without a
known target), optional `split` (`train`/`val`/`test`, default `--split`). Image names are file names relative
to `--data_dir`, with or without extension (names of one file, such as `img5` and `img5.png`, are one image,
with the id first written; a name without extension that fits two files is an error). The corpus of a split is every image its triplets use, plus, with
`--all_images_in_corpus`, every image of the folder (a larger gallery of distractors).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

from modeling_spn4cir.cli import add_debug_flag, run_cli
from modeling_spn4cir.image_store import IMAGE_EXTENSIONS
from modeling_spn4cir.storage import check_output_dir

from .common import (
    SPLITS,
    AnnotationError,
    SplitData,
    check_text,
    counts_table,
    read_text,
    resolve_inside,
    write_cir_dataset,
)
from .image_checks import check_images

TOOL = "datasets_scripts.custom"


def _records(path: Path) -> list[dict]:
    """The records of a UTF-8 .csv (a BOM, as Excel writes it, is accepted), .jsonl or .json (JSON lines, or one
    JSON list of records) file."""
    if path.suffix.lower() not in (".csv", ".jsonl", ".json"):
        raise ValueError(f"{path}: annotations must be .csv or .jsonl.")
    text = read_text(path)  # names the file and line of a non-UTF-8 byte
    if path.suffix.lower() == ".csv":
        try:
            records = list(csv.DictReader(io.StringIO(text, newline="")))
        except csv.Error as error:
            raise AnnotationError(f"{path}: malformed CSV ({error}).") from error
        for index, record in enumerate(records):
            if None in record:
                raise AnnotationError(f"{path}: record {index} has more values than the header has columns "
                                      f"({list(record)[:-1]}); fix the CSV (quote texts that hold commas).")
    elif path.suffix.lower() == ".json" and text.lstrip().startswith("["):  # one JSON list of records
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise AnnotationError(f"{path}: malformed JSON at line {error.lineno} column {error.colno}: "
                                  f"{error.msg}.") from error
    else:
        records = []
        for line_number, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise AnnotationError(f"{path}: malformed JSON on line {line_number + 1}: {error.msg}.") from error
    if not records:
        raise AnnotationError(f"{path}: no records; add (reference, text, target) rows (see --help).")
    return records


def _image_path(data_dir: Path, name: str, source: str) -> Path:
    """The image file `name` (with or without its extension) under `data_dir`, symbolic links resolved and
    kept inside `data_dir`."""
    path = resolve_inside(data_dir, name, source)
    if path.suffix.lower() in IMAGE_EXTENSIONS or path.exists():
        return path
    found = [f"{name}{ext}" for ext in dict.fromkeys(e.lower() for e in IMAGE_EXTENSIONS)
             if (data_dir / f"{name}{ext}").exists()]
    if len(found) > 1:
        raise AnnotationError(f"{source}: {name!r} names {len(found)} files under {data_dir} ({', '.join(found)}); "
                              "write the name with its extension in the annotations.")
    return resolve_inside(data_dir, found[0], source) if found else path


def _one_id_per_file(splits: dict[str, SplitData], data_dir: Path, annotations: Path) -> dict[str, Path]:
    """`{image id: file}` of every image the triplets name, with names of one file (`img5` and `img5.png`, a link
    and its target) made one id: the first name the annotations give it, written back into the triplets, so
    that a file is never two images of the corpus (a copy of the target among its own negatives)."""
    paths, canonical = {}, {}
    for data in splits.values():
        for triplet in data.triplets:
            for key in ("reference_id", "target_id"):
                name = triplet[key]
                if name is None:
                    continue
                if name not in canonical:
                    path = _image_path(data_dir, name, f"{annotations} image {name!r}")
                    first = next((i for i, p in paths.items() if p == path), None)
                    canonical[name] = first or name
                    paths.setdefault(canonical[name], path)
                triplet[key] = canonical[name]
    merged = {name: first for name, first in canonical.items() if name != first}
    if merged:
        print(f"{len(merged)} image names name the file of another and use its id: "
              + ", ".join(f"{a!r} -> {b!r}" for a, b in list(merged.items())[:5]))
    return paths


def _id(record: dict, name: str, path: Path, index: int, required: bool) -> str | None:
    """Field `name` of a record as a string (CSV cells are strings, JSONL may hold numbers)."""
    value = record.get(name)
    if value is None or value == "":
        if required:
            raise AnnotationError(f"{path}: record {index} has no field {name!r}.")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise AnnotationError(f"{path}: record {index} field {name!r} is a {type(value).__name__} ({value!r:.80}), "
                              "expected a string (an image name); fix the record.")
    return str(value)


def build_custom(
    data_dir: str | Path,
    annotations: str | Path,
    output_dir: str | Path,
    split: str = "train",
    all_images_in_corpus: bool = False,
    skip_missing_images: bool = False,
    skip_bad_images: bool = False,
    overwrite_output_dir: bool = False,
) -> Path:
    """Convert an image folder + annotations into `output_dir`, which must be new, empty, or (with
    `overwrite_output_dir`) a previous output of this converter, and must not be or contain `data_dir` or
    `annotations`."""
    data_dir, annotations = Path(data_dir), Path(annotations)
    check_output_dir(output_dir, TOOL, overwrite_output_dir, [data_dir, annotations])  # before the work
    splits: dict[str, SplitData] = {}
    for index, record in enumerate(_records(annotations)):
        if not isinstance(record, dict):
            raise AnnotationError(f"{annotations}: record {index} is a {type(record).__name__}, expected an object.")
        check_text(record, annotations, f"record {index}")
        text_field = "text" if record.get("text") not in (None, "") else "modification_text"
        text = record.get(text_field)
        reference = _id(record, "reference", annotations, index, required=True)
        if text is None or text == "":
            raise AnnotationError(f"{annotations}: record {index} has no field 'text'.")
        if not isinstance(text, str):
            raise AnnotationError(f"{annotations}: record {index} field {text_field!r} is a {type(text).__name__} "
                                  f"({text!r:.80}), expected one string; write one record per text.")
        record_split = record.get("split") or split
        if record_split not in SPLITS:
            raise AnnotationError(f"{annotations}: record {index} split {record_split!r} is not one of {SPLITS}.")
        data = splits.setdefault(record_split, SplitData())
        data.triplets.append({
            "reference_id": reference,
            "target_id": _id(record, "target", annotations, index, required=False),
            "modification_texts": [text],
            "source": "annotated",
        })
    folder_images = []
    if all_images_in_corpus:
        folder_images = sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    files = _one_id_per_file(splits, data_dir, annotations)
    for name, data in splits.items():
        ids = [t["reference_id"] for t in data.triplets] + [t["target_id"] for t in data.triplets if t["target_id"]]
        paths = {i: files[i] for i in dict.fromkeys(ids)}
        for image in folder_images:
            path = resolve_inside(data_dir, image, f"{data_dir} file {image!r}")
            if path not in paths.values():
                paths[image] = path
        data.corpus = [{"image_id": i, "path": p} for i, p in paths.items()]
    check_images(splits, skip_missing_images, str(data_dir), skip_bad_images=skip_bad_images)
    print(counts_table(splits))
    card = f"# Custom CIR data in the spn4cir schema\n\nConverted with `python -m datasets_scripts.custom` from " \
           f"`{annotations.name}`.\n\n{counts_table(splits)}"
    return write_cir_dataset(output_dir, splits, card=card, tool=TOOL, overwrite=overwrite_output_dir,
                             protect=[data_dir, annotations])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="folder with the images")
    parser.add_argument("--annotations", required=True, help=".csv or .jsonl with reference, text, target")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--split", default="train", choices=SPLITS, help="split of records without a 'split' column")
    parser.add_argument("--all_images_in_corpus", action="store_true")
    parser.add_argument("--skip_missing_images", action="store_true")
    parser.add_argument("--skip_bad_images", action="store_true",
                        help="leave out images that do not decode and drop their triplets (counted) instead of failing")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="replace --output_dir when it holds a previous output of this converter (never other files)")
    args = add_debug_flag(parser).parse_args(argv)
    out = build_custom(args.data_dir, args.annotations, args.output_dir, args.split, args.all_images_in_corpus,
                       args.skip_missing_images, args.skip_bad_images, args.overwrite_output_dir)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
