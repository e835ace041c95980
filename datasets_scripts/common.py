"""What every benchmark converter shares: safe paths, strict annotation reading, the corpus + triplets
schema (DESIGN §3), and writing an HF dataset directory (Parquet shards + README YAML `configs:`) atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from modeling_spn4cir.atomic import atomic_directory

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SHARD_BYTES = 256 * 2**20  # images per Parquet shard, by encoded size

CORPUS_FEATURES = {"image_id": datasets.Value("string"), "image": datasets.Image()}
TRIPLET_FEATURES = {
    "reference_id": datasets.Value("string"),
    "target_id": datasets.Value("string"),
    "modification_texts": datasets.List(datasets.Value("string")),
    "source": datasets.Value("string"),
}


class AnnotationError(ValueError):
    """A malformed annotation file or record; the message names the file, the record and the field."""


# ------------------------------------------------------------------------------------------- reading
def resolve_inside(root: str | os.PathLike, relative: str, source: str) -> Path:
    """`root / relative`, refusing absolute paths and `..` escapes (annotation files are untrusted)."""
    root = Path(root).resolve()
    if os.path.isabs(relative) or Path(relative).is_absolute():
        raise AnnotationError(f"{source}: absolute path {relative!r} is not allowed; paths must be relative to {root}.")
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise AnnotationError(f"{source}: path {relative!r} escapes the data directory {root}.")
    return path


def read_json(path: Path):
    """Parse a JSON annotation file; a missing or malformed file names itself and the fix."""
    if not path.exists():
        raise FileNotFoundError(f"Annotation file {path} not found; check --data_dir and the dataset's layout.")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise AnnotationError(f"{path}: malformed JSON at line {error.lineno} column {error.colno}: {error.msg}.") from error


def require(record, fields: Sequence[str], path: Path, index: int, types: dict | None = None) -> None:
    """Check that record `index` of `path` is an object with `fields` (of `types` where given)."""
    if not isinstance(record, dict):
        raise AnnotationError(f"{path}: record {index} is a {type(record).__name__}, expected an object.")
    for name in fields:
        if name not in record or record[name] is None:
            raise AnnotationError(f"{path}: record {index} has no field {name!r}.")
        expected = (types or {}).get(name)
        if expected and not isinstance(record[name], expected):
            raise AnnotationError(
                f"{path}: record {index} field {name!r} is a {type(record[name]).__name__}, expected "
                f"{expected.__name__ if isinstance(expected, type) else expected}."
            )


def require_listed(roles_and_ids, listed, path: Path, index: int, split_file: Path) -> None:
    """Every `(role, image_id)` of record `index` of `path` must be listed in `split_file` (None ids skipped)."""
    for role, image_id in roles_and_ids:
        if image_id is not None and image_id not in listed:
            raise AnnotationError(f"{path}: record {index} {role} {image_id!r} is not listed in {split_file.name}.")


def find_image(directory: Path, stem: str) -> Path | None:
    """`directory/stem.<ext>` for the first known image extension that exists."""
    for ext in IMAGE_EXTENSIONS:
        path = directory / f"{stem}{ext}"
        if path.exists():
            return path
    return None


# ------------------------------------------------------------------------------------------- content
@dataclass
class SplitData:
    """One split in the project schema. `corpus` rows: `image_id`, `path` (+ extra columns such as
    `category`); `triplets` rows: the triplet schema (`target_id` None on test splits)."""

    corpus: list[dict] = field(default_factory=list)
    triplets: list[dict] = field(default_factory=list)
    skipped_triplets: int = 0
    missing_images: list[str] = field(default_factory=list)


def check_images(
    splits: dict[str, SplitData], skip_missing_images: bool, where: str, image_key=lambda t: ()
) -> dict[str, SplitData]:
    """Make sure every image the corpus lists exists. Without `skip_missing_images` a missing image is an
    error naming how many and the first ones; with it, the images leave the corpus and the triplets that use
    them are dropped, counted in `SplitData.skipped_triplets` / `missing_images`."""
    missing_all = {}
    for split, data in splits.items():
        missing = [row["image_id"] for row in data.corpus if row["path"] is None or not Path(row["path"]).exists()]
        if missing:
            missing_all[split] = list(dict.fromkeys(missing))
    if missing_all and not skip_missing_images:
        total = sum(len(v) for v in missing_all.values())
        first = [f"{s}:{i}" for s, ids in missing_all.items() for i in ids][:5]
        raise FileNotFoundError(
            f"{total} images listed in the annotations are missing under {where} (first: {first}); restore them, or "
            "pass --skip_missing_images to drop the triplets that use them (the counts go into the dataset card)."
        )
    for split, missing in missing_all.items():
        data = splits[split]
        gone = set(missing)
        data.missing_images = missing
        data.corpus = [row for row in data.corpus if row["image_id"] not in gone]
        kept = [t for t in data.triplets if not (_triplet_images(t) & gone)]
        data.skipped_triplets = len(data.triplets) - len(kept)
        data.triplets = kept
        print(f"[{split}] {len(missing)} images missing: dropped {data.skipped_triplets} triplets "
              f"({len(kept)} kept).")
    return splits


def _triplet_images(triplet: dict) -> set[str]:
    ids = {triplet["reference_id"]}
    if triplet.get("target_id"):
        ids.add(triplet["target_id"])
    ids.update(triplet.get("target_ids") or ())
    ids.update(triplet.get("group_members") or ())
    return ids


# ------------------------------------------------------------------------------------------- writing
def _image_rows(rows: list[dict], columns: list[str]) -> Iterator[tuple[dict, bytes]]:
    """Yield (one Arrow-ready row with the encoded image embedded, its bytes). A row carries its image as a
    file `path` or as `image_bytes` (e.g. taken undecoded from another dataset)."""
    for row in rows:
        if row.get("path") is not None:
            data, name = Path(row["path"]).read_bytes(), Path(row["path"]).name
        else:
            data, name = row["image_bytes"], row.get("image_name")
        out = {c: row.get(c) for c in columns}
        out["image"] = {"bytes": data, "path": name}
        yield out, data


def _write_split(rows: Iterable[tuple[dict, bytes]], features: datasets.Features, directory: Path, split: str,
                 total: int, desc: str) -> str:
    """Write Parquet shards of at most ~SHARD_BYTES; return their glob pattern.

    Shard names carry a fingerprint of the content because `datasets` caches a local directory by its
    name and YAML config, not by its files: a rebuilt `out/` with the same patterns would load stale data.
    """
    schema = features.arrow_schema
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    shards, batch, size = [], [], 0

    def flush():
        nonlocal batch, size
        path = directory / f".{split}-{len(shards):05d}.parquet"
        pq.write_table(pa.Table.from_pylist(batch, schema=schema), path)
        shards.append(path)
        batch, size = [], 0

    for row, payload in tqdm(rows, total=total, desc=desc, leave=False):
        digest.update(json.dumps({k: v for k, v in row.items() if k != "image"}, sort_keys=True).encode())
        digest.update(payload)
        batch.append(row)
        size += len(payload)
        if size >= SHARD_BYTES:
            flush()
    if batch or not shards:
        flush()
    fingerprint = digest.hexdigest()[:12]
    for i, path in enumerate(shards):
        path.rename(directory / f"{split}-{fingerprint}-{i:05d}-of-{len(shards):05d}.parquet")
    return f"{directory.name}/{split}-{fingerprint}-*.parquet"


def write_cir_dataset(
    output_dir: str | os.PathLike,
    splits: dict[str, SplitData],
    corpus_extra: dict[str, datasets.FeatureType] | None = None,
    triplet_extra: dict[str, datasets.FeatureType] | None = None,
    card: str = "",
    shared_corpus: dict[str, str] | None = None,
) -> Path:
    """Write `output_dir` with configs `corpus` and `triplets` (one Parquet split per `splits` key) and a
    README whose YAML `configs:` lets `load_dataset(output_dir, "triplets", split=...)` find them.

    `shared_corpus` maps a split to another split whose corpus files it reuses (CIRCO's val and test share
    one gallery, stored once). The directory is built aside and moved into place: complete or absent.
    """
    output_dir = Path(output_dir)
    corpus_features = datasets.Features({**CORPUS_FEATURES, **(corpus_extra or {})})
    triplet_features = datasets.Features({**TRIPLET_FEATURES, **(triplet_extra or {})})
    shared_corpus = shared_corpus or {}
    with atomic_directory(output_dir) as staging:
        data_files = {"corpus": {}, "triplets": {}}
        for split, data in splits.items():
            if split not in shared_corpus:
                columns = [c for c in corpus_features if c != "image"]
                data_files["corpus"][split] = _write_split(
                    _image_rows(data.corpus, columns), corpus_features, staging / "corpus", split,
                    len(data.corpus), f"corpus/{split}",
                )
            if not data.triplets:
                # `datasets` cannot load an empty split, so it is left out (and the card says so).
                if data.skipped_triplets:
                    print(f"[{split}] no triplets left: the triplets config has no {split!r} split.")
                continue
            rows = [({c: t.get(c) for c in triplet_features}, b"") for t in data.triplets]
            data_files["triplets"][split] = _write_split(
                rows, triplet_features, staging / "triplets", split, len(rows), f"triplets/{split}"
            )
        for split, source in shared_corpus.items():
            data_files["corpus"][split] = data_files["corpus"][source]
        (staging / "README.md").write_text(_readme(data_files, card))
    return output_dir


def _readme(data_files: dict[str, dict[str, str]], card: str) -> str:
    lines = ["---", "configs:"]
    for config, splits in data_files.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split, pattern in splits.items():
            lines += [f"  - split: {split}", f"    path: {pattern}"]
    lines += ["---", ""]
    return "\n".join(lines) + card


def counts_table(splits: dict[str, SplitData], shared_corpus: dict[str, str] | None = None) -> str:
    """Markdown table of the counts per split (for the dataset card and the CLI)."""
    rows = ["| split | triplets | corpus images | triplets dropped (missing images) | missing images |", "|---|---|---|---|---|"]
    for split, data in splits.items():
        corpus = splits[(shared_corpus or {}).get(split, split)].corpus
        triplets = len(data.triplets) if data.triplets else "0 (split not written)"
        rows.append(f"| {split} | {triplets} | {len(corpus)} | {data.skipped_triplets} | "
                    f"{len(data.missing_images)} |")
    return "\n".join(rows) + "\n"


def select_splits(requested: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    requested = list(requested or available)
    unknown = [s for s in requested if s not in available]
    if unknown:
        raise ValueError(f"Unknown split(s) {unknown}; choose from {list(available)}.")
    return requested


def converter_main(build, doc: str, splits: Sequence[str], argv=None, extra=None) -> None:
    """The command line of a benchmark converter: `--data_dir --output_dir [--splits ...] [--skip_missing_images]`
    (plus `extra(parser)` options, passed to `build` by name)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--splits", nargs="+", choices=list(splits))
    parser.add_argument("--skip_missing_images", action="store_true",
                        help="drop triplets whose images are missing (counted in the card) instead of failing")
    if extra is not None:
        extra(parser)
    args = vars(parser.parse_args(argv))
    out = build(args.pop("data_dir"), args.pop("output_dir"), **args)
    print(f"wrote {out}")
