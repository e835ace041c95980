"""FashionIQ (Wu et al., CVPR 2021) from its official layout to an HF dataset in the project schema.

    python -m datasets_scripts.fashioniq --data_dir fashionIQ_dataset --output_dir fashioniq-hf [--skip_missing_images]

Layout: `captions/cap.{dress,shirt,toptee}.{train,val,test}.json` (records `{"candidate", "target",
"captions": [2 strings]}`; test has no `target`), `image_splits/split.{cat}.{split}.json` (lists of ASINs),
`images/<ASIN>.png` (or .jpg). Reference = `candidate`. The corpus of a split is the union of the categories'
split files, one row per (image, category): the val gallery of a category is its `split.{cat}.val.json`
(3,817 / 6,346 / 5,373 images; 121 ASINs are in two categories and appear once in each).
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
    find_image,
    read_json,
    require,
    require_listed,
    require_strings,
    select_splits,
    write_cir_dataset,
)
from .image_checks import check_images

CATEGORIES = ("dress", "shirt", "toptee")
TOOL = "datasets_scripts.fashioniq"


def _read_split(data_dir: Path, split: str, categories) -> SplitData:
    data = SplitData()
    images = data_dir / "images"
    for category in categories:
        split_file = data_dir / "image_splits" / f"split.{category}.{split}.json"
        asins = read_json(split_file)
        if not isinstance(asins, list) or not all(isinstance(a, str) for a in asins):
            bad = next((a for a in asins if not isinstance(a, str)), None) if isinstance(asins, list) else None
            raise AnnotationError(f"{split_file}: expected a JSON list of ASIN strings"
                                  + (f", found {bad!r}" if bad is not None else "") + ".")
        in_split = set(asins)
        for asin in dict.fromkeys(asins):
            # ids are untrusted: `../../x` or an absolute id must not pull in files from outside images/
            path = find_image(images, asin, f"{split_file} image {asin!r}")
            data.corpus.append({"image_id": asin, "path": path, "category": category})
        caption_file = data_dir / "captions" / f"cap.{category}.{split}.json"
        records = read_json(caption_file)
        if not isinstance(records, list):
            raise AnnotationError(f"{caption_file}: expected a JSON list of records.")
        fields = ["candidate", "captions"] + ([] if split == "test" else ["target"])
        for index, record in enumerate(records):
            require(record, fields, caption_file, index, {"candidate": str, "target": str, "captions": list})
            require_strings(record, "captions", caption_file, index)
            target = record.get("target") if split != "test" else None
            require_listed((("candidate", record["candidate"]), ("target", target)), in_split, caption_file, index,
                           split_file)
            data.triplets.append({
                "reference_id": record["candidate"],
                "target_id": target,
                "modification_texts": list(record["captions"]),
                "category": category,
                "source": "annotated",
            })
    if not data.triplets or not data.corpus:  # `datasets` cannot load an empty split
        files = "captions/cap" if not data.triplets else "image_splits/split"
        raise AnnotationError(f"{data_dir}: the {split!r} split is empty ({files}.{{{','.join(categories)}}}.{split}.json "
                              "hold no records); restore the files, or leave the split out with --splits.")
    return data


def build_fashioniq(
    data_dir: str | Path,
    output_dir: str | Path,
    splits=None,
    categories=CATEGORIES,
    skip_missing_images: bool = False,
    skip_bad_images: bool = False,
    overwrite_output_dir: bool = False,
) -> Path:
    """Convert FashionIQ under `data_dir` into `output_dir` (configs `corpus` and `triplets`).

    `output_dir` must be new, empty, or (with `overwrite_output_dir`) a previous FashionIQ conversion, and
    outside `data_dir`."""
    data_dir = Path(data_dir)
    check_output_dir(output_dir, TOOL, overwrite_output_dir, [data_dir])  # before the work, not after it
    chosen = {s: _read_split(data_dir, s, categories) for s in select_splits(splits, SPLITS)}
    check_images(chosen, skip_missing_images, str(data_dir / "images"), skip_bad_images=skip_bad_images)
    card = _card(chosen, categories)
    print(counts_table(chosen))
    return write_cir_dataset(
        output_dir, chosen,
        corpus_extra={"category": datasets.Value("string")},
        triplet_extra={"category": datasets.Value("string")},
        card=card, tool=TOOL, overwrite=overwrite_output_dir, protect=[data_dir],
    )


def _card(splits: dict[str, SplitData], categories) -> str:
    return f"""# FashionIQ in the spn4cir schema

Converted with `python -m datasets_scripts.fashioniq` from the official FashionIQ layout (annotations from
XiaoxiaoGuo/fashion-iq, Community Data License Agreement; images are Amazon product photos, check their terms).
Categories: {", ".join(categories)}. `reference_id` = `candidate`; `modification_texts` = the two captions
(joined as "c0 and c1" for evaluation); test triplets have no target. The corpus of a split is the union of the
categories' `split.{{cat}}.{{split}}.json` files, one row per (image, category).

{counts_table(splits)}
Evaluation: FashionIQ val, per-category gallery; see `trainers.evaluation` for the two reference-removal protocols.
"""


def main(argv=None):
    def categories(parser):
        parser.add_argument("--categories", nargs="+", choices=CATEGORIES, default=list(CATEGORIES))

    converter_main(build_fashioniq, __doc__, SPLITS, argv, extra=categories)


if __name__ == "__main__":
    run_cli(main)
