"""Any image collection without annotations -> a corpus in the project schema, for positive scaling (zero-shot CIR).

    python -m datasets_scripts.images --images DIR_OR_DATASET --output_dir OUT [--image_column COL] [--id_column COL]
        [--caption_column COL] [--split S] [--limit N] [--seed S] [--skip_bad_images] [--overwrite_output_dir]

Sources:
- a folder of image files, searched recursively (the extensions of the other converters); ids are the files' paths
  relative to the folder, POSIX style (`cats/001.jpg`);
- a dataset with an image column, read with `datasets.load_dataset`: a local dataset directory (Parquet, Arrow,
  an image folder, webdataset `.tar` shards such as CC3M's), one `.parquet` / `.arrow` / `.tar` file, or a Hub id.
  A directory is read as a dataset when it holds Parquet, Arrow or `.tar` files or `--image_column` is given, else
  as a folder of image files. `--split` picks the split (default `train`, or the only one). The image column is
  `--image_column`, or the only `Image` column; ids are `--id_column`, else the `image_id` column, else
  webdataset's `__key__`, else the row index in the split (the card says which). `--caption_column` (e.g. CC3M's
  alt texts, `txt`) is kept as the corpus' `caption`.

`--limit N` keeps a random sample of N images (`--seed`, reproducible; the sample keeps the source's order), e.g.
the paper's 50k CC3M images. Every image is checked to decode (`--skip_bad_images` leaves the others out, counted).
The output has the `corpus` config alone (split `train`, no triplets); caption and pair it with
`examples/generate_triplets.py --dataset OUT --pool corpus ...`.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from modeling_spn4cir.image_files import list_image_files
from modeling_spn4cir.cli import run_cli
from modeling_spn4cir.storage import OutputDirError, check_output_dir

from .common import IMAGE_EXTENSIONS, SplitData, converter_main, counts_table, resolve_inside, write_cir_dataset
from .image_checks import bad_images_error, find_bad_images, image_problem

TOOL = "datasets_scripts.images"
CORPUS_SPLIT = "train"
PACKAGED = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset"}  # one-file datasets: their builder
AUTO_ID_COLUMNS = ("image_id", "__key__")


@dataclass
class Collection:
    """The images of a source: corpus `rows` (`image_id` and `path` or `load_image`, optional `caption`), how many
    images the source has (`total`, before sampling), how the ids were made and where the images came from."""

    rows: list[dict]
    total: int
    ids: str
    kind: str
    bad: list[str] = field(default_factory=list)


def _sample(n: int, limit: int | None, seed: int) -> list[int]:
    """Row positions of a reproducible random sample of `limit` of `n` rows, in source order (all if None)."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise ValueError(f"--limit must be a positive number of images, got {limit}.")
    return sorted(random.Random(seed).sample(range(n), limit))


def folder_collection(root: Path, limit: int | None, seed: int) -> Collection:
    """The image files under `root` (the one folder rule, `list_image_files`: recursive, hidden folders skipped,
    sorted by relative path), a sample of `limit` of them. Broken links and unreadable files stay in, so that the
    decoding check names them (or, with --skip_bad_images, counts them)."""
    folder = list_image_files(root)
    names = sorted(p.relative_to(root).as_posix() for p in [*folder.files, *folder.unreadable])
    if not names:
        raise FileNotFoundError(
            f"No image file ({', '.join(IMAGE_EXTENSIONS)}) under {root} (searched recursively)"
            f"{'; ' + folder.left_out() if folder.left_out() else ''}. Pass a folder of "
            "images, or a dataset with an image column (a dataset directory, a .parquet / .tar file or a Hub id; "
            "--image_column names the column)."
        )
    rows = [{"image_id": name, "path": resolve_inside(root, name, f"{root} file {name!r}")}
            for name in (names[i] for i in _sample(len(names), limit, seed))]
    return Collection(rows, len(names), "the files' paths relative to the folder", f"a folder of {len(names)} images")


def _load(source: str, split: str | None) -> datasets.Dataset:
    """`split` of the dataset `source` (a directory, a one-file dataset or a Hub id)."""
    path = Path(source)
    if path.is_file():
        if path.suffix.lower() not in PACKAGED:
            raise ValueError(f"{source} is a {path.suffix or 'suffix-less'} file; pass a folder of images, a dataset "
                             f"directory, a {' / '.join(PACKAGED)} file, or a Hub id.")
        return datasets.load_dataset(PACKAGED[path.suffix.lower()], data_files={"train": str(path)},
                                     split=split or "train")
    if split is None:
        names = datasets.get_dataset_split_names(source)
        if "train" not in names and len(names) != 1:
            raise ValueError(f"{source} has the splits {names}; pass --split to choose one.")
        split = "train" if "train" in names else names[0]
    return datasets.load_dataset(source, split=split)


def _column(dataset, name: str | None, what: str, source: str) -> str | None:
    """`name` if `dataset` has that column (an error listing the columns if not)."""
    if name is not None and name not in dataset.column_names:
        raise ValueError(f"{source} has no column {name!r} (--{what}); its columns are {dataset.column_names}.")
    return name


def _image_column(dataset, name: str | None, source: str) -> str:
    """The column holding the images: `name` (checked), or the dataset's only `Image` column."""
    images = [c for c, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    if _column(dataset, name, "image_column", source) is not None:
        if name not in images:
            raise ValueError(f"{source}: column {name!r} holds {dataset.features[name]}, not images; its image "
                             f"columns are {images} (of {dataset.column_names}).")
        return name
    if len(images) != 1:
        found = f"the image columns {images}" if images else "no image column"
        raise ValueError(f"{source} has {found} (columns {dataset.column_names}, features {dict(dataset.features)}); "
                         "pass --image_column.")
    return images[0]


def _ids(dataset, rows: list[int], id_column: str | None, source: str) -> tuple[list[str], str]:
    """The ids of `rows` and how they were made: `id_column`, else the first of `AUTO_ID_COLUMNS` the dataset has,
    else the row index in the split. Duplicates are an error naming them and the fix."""
    column = _column(dataset, id_column, "id_column", source) or next(
        (c for c in AUTO_ID_COLUMNS if c in dataset.column_names), None)
    if column is None:
        return [str(i) for i in rows], "the row index in the split"
    values = dataset.select(rows)[column] if len(rows) < len(dataset) else dataset[column]
    ids = ["" if v is None else str(v) for v in values]
    unusable = [i for i, n in Counter(ids).items() if n > 1 or not i]
    if unusable:
        raise ValueError(f"{source}: the id column {column!r} has repeated or empty values (first: {unusable[:5]}); "
                         "pass --id_column naming a column of unique ids.")
    return ids, f"column {column!r}"


def _loader(dataset, column: str, row: int):
    """`load_image` of row `row`: its stored bytes (or its file's) and file name, read when called."""
    def load() -> tuple[bytes, str | None]:
        value = dataset[row][column] or {}
        name = value.get("path")
        data = value.get("bytes")
        if data is None and name:
            data = Path(name).read_bytes()
        return data or b"", name and Path(name).name

    return load


def dataset_collection(source: str, image_column: str | None, id_column: str | None, caption_column: str | None,
                       split: str | None, limit: int | None, seed: int) -> Collection:
    """The images of a dataset's `split`, a sample of `limit` of them."""
    dataset = _load(source, split)
    if len(dataset) == 0:
        raise ValueError(f"{source} (split {split or 'train'}) has no rows: there is no image to convert.")
    column = _image_column(dataset, image_column, source)
    _column(dataset, caption_column, "caption_column", source)
    rows = _sample(len(dataset), limit, seed)
    ids, made = _ids(dataset, rows, id_column, source)
    undecoded = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    captions = dataset.select(rows)[caption_column] if caption_column else [None] * len(rows)
    corpus = [{"image_id": i, "load_image": _loader(undecoded, column, r), "caption": None if c is None else str(c)}
              for i, r, c in zip(ids, rows, captions)]
    return Collection(corpus, len(dataset), made, f"column {column!r} of a dataset of {len(dataset)} rows")


def _problem(load) -> str | None:
    """Why the image `load()` returns is not usable, or None."""
    try:
        return image_problem(load()[0])
    except OSError as error:  # an image stored as a path to a file that is gone
        return f"cannot be read ({type(error).__name__}: {error})"


def check_collection(collection: Collection, source: str, skip_bad_images: bool) -> None:
    """Every image must decode: the others are an error naming them, or (`skip_bad_images`) leave the corpus,
    listed in `collection.bad`. A collection left without any image is an error naming the source."""
    by_id = {row["image_id"]: row for row in collection.rows}
    if all("path" in row for row in collection.rows):
        bad_paths = find_bad_images(row["path"] for row in collection.rows)
        bad = {row["image_id"]: bad_paths[row["path"]] for row in collection.rows if row["path"] in bad_paths}
    else:
        bad = find_bad_images(by_id, lambda image_id: _problem(by_id[image_id]["load_image"]))
    if bad and len(bad) == len(collection.rows):
        shown = "; ".join(f"{i!r} {why}" for i, why in list(bad.items())[:3])
        raise ValueError(f"No image of {source} can be read ({len(bad)} tried: {shown}). Check that --images names "
                         "the collection (and --image_column its images), and that its files are images.")
    if bad and not skip_bad_images:
        raise bad_images_error({f"{source} image {i!r}": why for i, why in bad.items()})
    collection.bad = list(bad)
    collection.rows = [row for row in collection.rows if row["image_id"] not in bad]
    if bad:
        print(f"{len(bad)} images do not decode, left out (--skip_bad_images): {collection.bad[:20]}"
              f"{' ...' if len(bad) > 20 else ''}")


def _is_dataset_dir(path: Path, image_column: str | None) -> bool:
    return image_column is not None or any(p.suffix.lower() in PACKAGED for p in path.rglob("*"))


def build_images(images: str | Path, output_dir: str | Path, image_column: str | None = None,
                 id_column: str | None = None, caption_column: str | None = None, split: str | None = None,
                 limit: int | None = None, seed: int = 0, skip_bad_images: bool = False,
                 overwrite_output_dir: bool = False) -> Path:
    """Convert the image collection `images` (see the module docstring) into `output_dir`, which must be new,
    empty, or (with `overwrite_output_dir`) a previous output of this converter, and must not be or contain a
    local source."""
    source, path = str(images), Path(images)
    local = path if path.exists() else None
    check_output_dir(output_dir, TOOL, overwrite_output_dir, [local])  # before the work, not after it
    if local is not None and local.is_dir() and local.resolve() in Path(output_dir).resolve().parents:
        raise OutputDirError(f"The output directory {output_dir} is inside the collection {source}: a later run "
                             "would read it as part of the collection. Choose an output directory outside it.")
    if local is not None and local.is_dir() and not _is_dataset_dir(local, image_column):
        if id_column or caption_column or split:
            raise ValueError(f"{source} is read as a folder of image files: --id_column, --caption_column and "
                             "--split apply to datasets (pass --image_column to read the directory as a dataset).")
        collection = folder_collection(local, limit, seed)
    else:
        collection = dataset_collection(source, image_column, id_column, caption_column, split, limit, seed)
    check_collection(collection, source, skip_bad_images)
    data = SplitData(corpus=collection.rows, bad_images=collection.bad)
    print(counts_table({CORPUS_SPLIT: data}))
    sample = (f"a random sample (seed {seed}) of {len(collection.rows) + len(collection.bad)} of {collection.total} "
              "images" if len(collection.rows) + len(collection.bad) < collection.total else "every image")
    card = f"""# An image collection in the spn4cir schema

Converted with `python -m datasets_scripts.images` from `{path.name if local else source}` ({collection.kind}):
{sample}. Image ids: {collection.ids}.

There are no annotated triplets (config `corpus` only): caption and pair the images with
`python examples/generate_triplets.py --dataset <this directory> --pool corpus ...`.

{counts_table({CORPUS_SPLIT: data})}"""
    extra = {"caption": datasets.Value("string")} if caption_column else None
    return write_cir_dataset(output_dir, {CORPUS_SPLIT: data}, corpus_extra=extra, card=card, tool=TOOL,
                             overwrite=overwrite_output_dir, protect=[local], corpus_only=True)


def _options(parser) -> None:
    parser.add_argument("--image_column", help="the dataset column holding the images (default: its Image column)")
    parser.add_argument("--id_column", help="the dataset column of unique image ids (default: image_id, __key__ or "
                                            "the row index)")
    parser.add_argument("--caption_column", help="a dataset column kept as the corpus' caption (e.g. CC3M's txt)")
    parser.add_argument("--split", help="the dataset split (default: train, or the only one)")
    parser.add_argument("--limit", type=int, help="keep a random sample of this many images")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed")


def main(argv=None):
    converter_main(build_images, __doc__, None, argv, _options, source="images",
                   source_help="a folder of images, a dataset directory or file, or a Hub dataset id")


if __name__ == "__main__":
    run_cli(main)
