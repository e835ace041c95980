"""CIRR rc2 (Liu et al., ICCV 2021) from its official layout to an HF dataset in the project schema.

    python -m datasets_scripts.cirr --data_dir CIRR --output_dir cirr-hf [--splits val test] [--skip_missing_images]

Layout: `cirr/captions/cap.rc2.{train,val,test1}.json` (records with `pairid`, `reference`, `target_hard`,
`caption`, `img_set.members` — 6 images including the reference; test1 has no target),
`cirr/image_splits/split.rc2.{train,val,test1}.json` (name -> relative path such as `./dev/dev-244-0-img0.png`),
images under `data_dir` at those paths. `test1` becomes split `test`. The corpus of a split is every image of
its split file: about 6% of CIRR targets are never references, so a gallery of references would miss them.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from modeling_spn4cir.cli import run_cli
from modeling_spn4cir.storage import check_output_dir

from .common import (
    SPLITS,
    AnnotationError,
    SplitData,
    converter_main,
    counts_table,
    read_nonempty,
    read_records,
    require,
    require_listed,
    require_strings,
    resolve_inside,
    select_splits,
    write_cir_dataset,
)
from .image_checks import check_images

FILE_SPLIT = {"train": "train", "val": "val", "test": "test1"}
TOOL = "datasets_scripts.cirr"


def _read_split(data_dir: Path, split: str) -> SplitData:
    name = FILE_SPLIT[split]
    split_file = data_dir / "cirr" / "image_splits" / f"split.rc2.{name}.json"
    mapping = read_nonempty(split_file, dict, "a JSON object mapping image names to relative paths",
                            "images (an empty object)")
    data = SplitData()
    for image_id, relative in mapping.items():
        if not isinstance(relative, str):
            raise AnnotationError(f"{split_file}: image {image_id!r} has a {type(relative).__name__} path, expected a string.")
        path = resolve_inside(data_dir, relative, f"{split_file} image {image_id!r}")
        data.corpus.append({"image_id": image_id, "path": path})

    caption_file = data_dir / "cirr" / "captions" / f"cap.rc2.{name}.json"
    records = read_records(caption_file)
    fields = ["pairid", "reference", "caption", "img_set"] + ([] if split == "test" else ["target_hard"])
    for index, record in enumerate(records):
        require(record, fields, caption_file, index, {"pairid": (int, str), "reference": str, "caption": str,
                                                      "img_set": dict, "target_hard": str})
        if not isinstance(record["img_set"].get("members"), list) or not record["img_set"]["members"]:
            raise AnnotationError(f"{caption_file}: record {index} has no field 'img_set.members'.")
        members = require_strings(record["img_set"], "members", caption_file, index)
        target = record.get("target_hard") if split != "test" else None
        require_listed([("reference", record["reference"]), ("target_hard", target)]
                       + [("img_set.members", m) for m in members], mapping, caption_file, index, split_file)
        data.triplets.append({
            "reference_id": record["reference"],
            "target_id": target,
            "modification_texts": [record["caption"]],
            "group_members": list(members),
            "query_id": str(record["pairid"]),
            "source": "annotated",
        })
    return data


def build_cirr(data_dir: str | Path, output_dir: str | Path, splits=None, skip_missing_images: bool = False,
               skip_bad_images: bool = False, overwrite_output_dir: bool = False) -> Path:
    """Convert CIRR under `data_dir` into `output_dir` (configs `corpus` and `triplets`); `output_dir` must be
    new, empty, or (with `overwrite_output_dir`) a previous CIRR conversion, and outside `data_dir`."""
    data_dir = Path(data_dir)
    check_output_dir(output_dir, TOOL, overwrite_output_dir, [data_dir])  # before the work, not after it
    chosen = {s: _read_split(data_dir, s) for s in select_splits(splits, SPLITS)}
    check_images(chosen, skip_missing_images, str(data_dir), skip_bad_images=skip_bad_images)
    print(counts_table(chosen))
    card = f"""# CIRR (rc2) in the spn4cir schema

Converted with `python -m datasets_scripts.cirr` from the official CIRR layout (annotations from
Cuberick-Orion/CIRR, MIT; images are NLVR2 images, distributed by the CIRR authors on request).
`modification_texts` = [caption]; `group_members` = `img_set.members` (6, including the reference);
`query_id` = `pairid`; split `test` is `test1` (no targets: evaluate through the CIRR test server).
The corpus of a split is every image of its split file.

{counts_table(chosen)}"""
    return write_cir_dataset(
        output_dir, chosen,
        triplet_extra={"group_members": datasets.List(datasets.Value("string")), "query_id": datasets.Value("string")},
        card=card, tool=TOOL, overwrite=overwrite_output_dir, protect=[data_dir],
    )


def main(argv=None):
    converter_main(build_cirr, __doc__, SPLITS, argv)


if __name__ == "__main__":
    run_cli(main)
