"""What every benchmark converter shares: safe paths, strict annotation reading, the corpus + triplets
schema (DESIGN §3), and writing an HF dataset directory (Parquet shards + README YAML `configs:`) atomically.
The image checks (every listed image exists and decodes) are `image_checks`.
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

from modeling_spn4cir.cli import add_debug_flag
from modeling_spn4cir.image_store import IMAGE_EXTENSIONS
from modeling_spn4cir.storage import atomic_directory

SPLITS = ("train", "val", "test")
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
    """`root / relative` with symbolic links resolved, refusing absolute paths, `..` escapes and links that
    leave `root` (annotation files and downloaded trees are untrusted: a converted dataset may be published)."""
    root = Path(root).resolve()
    if not isinstance(relative, str):
        raise AnnotationError(f"{source}: the image name is a {type(relative).__name__}, expected a string.")
    if os.path.isabs(relative) or Path(relative).is_absolute():
        raise AnnotationError(f"{source}: absolute path {relative!r} is not allowed; paths must be relative to {root}.")
    try:
        path = (root / relative).resolve()
    except (ValueError, OSError) as error:  # e.g. an embedded NUL byte
        raise AnnotationError(f"{source}: {relative!r} is not a usable path ({error}).") from error
    if path != root and root not in path.parents:
        link = " through a symbolic link" if os.path.normpath(root / relative).startswith(str(root) + os.sep) else ""
        raise AnnotationError(f"{source}: path {relative!r} escapes the data directory {root}{link} (it resolves to "
                              f"{path}); only files inside the data directory are converted. Copy the file in, or "
                              "fix the annotation.")
    return path


def read_text(path: Path) -> str:
    """A UTF-8 annotation file's text (a BOM is accepted); other encodings are an error naming the file, the
    line and the fix."""
    if not path.exists():
        raise FileNotFoundError(f"Annotation file {path} not found; check --data_dir and the dataset's layout.")
    if path.is_dir():
        raise AnnotationError(f"{path} is a directory, expected an annotation file.")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise AnnotationError(
            f"{path}: not valid UTF-8 (byte {error.start}, line {line}: {raw[error.start:error.start + 4]!r}); "
            "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from None


def check_text(value, path: Path, where: str) -> None:
    """Every string in `value` must be encodable as UTF-8: JSON escapes such as "\\ud800" give lone surrogates
    that fail only when the dataset is written."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return
    except UnicodeEncodeError:
        pass
    stack = [(where, value)]
    while stack:
        name, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise AnnotationError(f"{path}: {name} holds {item!r}, which has a lone surrogate (an invalid "
                                      "\\uXXXX escape); fix the text.") from None
        elif isinstance(item, dict):
            prefix = f"{name} " if name else ""
            stack += [(f"{prefix}key {k!r}", k) for k in item] + [(f"{prefix}field {k!r}", v) for k, v in item.items()]
        elif isinstance(item, list):
            stack += [(f"{name}[{i}]" if name else f"record {i}", v) for i, v in enumerate(item)]


def read_json(path: Path):
    """Parse a JSON annotation file; a missing, non-UTF-8 or malformed file names itself and the fix."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise AnnotationError(f"{path}: malformed JSON at line {error.lineno} column {error.colno}: {error.msg}.") from error
    check_text(data, path, "")
    return data


def read_nonempty(path: Path, kind: type, expected: str, empty: str):
    """A JSON annotation file that must hold a non-empty `kind` (list or dict): an error names the file and says
    what was `expected`, or that it holds no `empty`, and the fix."""
    data = read_json(path)
    if not isinstance(data, kind):
        raise AnnotationError(f"{path}: expected {expected}.")
    if not data:
        raise AnnotationError(f"{path}: no {empty}; restore the file, or leave its split out with --splits.")
    return data


def read_records(path: Path) -> list:
    """A JSON annotation file that must be a non-empty list of records."""
    return read_nonempty(path, list, "a JSON list of records", "records (an empty list)")


def require(record, fields: Sequence[str], path: Path, index: int, types: dict | None = None) -> None:
    """Check that record `index` of `path` is an object with `fields` (of `types` where given)."""
    if not isinstance(record, dict):
        raise AnnotationError(f"{path}: record {index} is a {type(record).__name__}, expected an object.")
    for name in fields:
        if name not in record or record[name] is None:
            raise AnnotationError(f"{path}: record {index} has no field {name!r}.")
        expected = (types or {}).get(name)
        if expected and not isinstance(record[name], expected):
            names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
            raise AnnotationError(
                f"{path}: record {index} field {name!r} is a {type(record[name]).__name__} ({record[name]!r:.80}), "
                f"expected a {names}; fix the record."
            )


def require_strings(record: dict, name: str, path: Path, index: int) -> list[str]:
    """Field `name` of record `index` must be a non-empty list of strings."""
    value = record.get(name)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise AnnotationError(f"{path}: record {index} field {name!r} must be a non-empty list of strings, got "
                              f"{value!r:.80}.")
    return value


def require_listed(roles_and_ids, listed, path: Path, index: int, split_file: Path) -> None:
    """Every `(role, image_id)` of record `index` of `path` must be listed in `split_file` (None ids skipped)."""
    for role, image_id in roles_and_ids:
        if image_id is not None and image_id not in listed:
            raise AnnotationError(f"{path}: record {index} {role} {image_id!r} is not listed in {split_file.name}.")


def find_image(directory: Path, stem: str, source: str | None = None) -> Path | None:
    """`directory/stem.<ext>` for the first known image extension that exists (symbolic links resolved); with
    `source` (untrusted ids), a path leaving `directory` is an error naming `source`."""
    if source is not None:
        resolve_inside(directory, stem, source)
    for ext in IMAGE_EXTENSIONS:
        path = directory / f"{stem}{ext}"
        if path.exists():
            return resolve_inside(directory, f"{stem}{ext}", source) if source is not None else path
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
    bad_images: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- writing
def _image_rows(rows: list[dict], columns: list[str]) -> Iterator[tuple[dict, bytes]]:
    """Yield (one Arrow-ready row with the encoded image embedded, its bytes). A row carries its image as a
    file `path`, as `image_bytes` (e.g. taken undecoded from another dataset) or as `load_image`, a function
    returning (bytes, file name) when the row is written (a large collection is never held in memory)."""
    for row in rows:
        if row.get("path") is not None:
            data, name = Path(row["path"]).read_bytes(), Path(row["path"]).name
        elif "load_image" in row:
            data, name = row["load_image"]()
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
    tool: str = "datasets_scripts",
    overwrite: bool = False,
    protect: Iterable[str | os.PathLike | None] = (),
    corpus_only: bool = False,
) -> Path:
    """Write `output_dir` with configs `corpus` and `triplets` (one Parquet split per `splits` key) and a
    README whose YAML `configs:` lets `load_dataset(output_dir, "triplets", split=...)` find them.
    `corpus_only=True` writes an image collection without triplets: the `corpus` config alone.

    `shared_corpus` maps a split to another split whose corpus files it reuses (CIRCO's val and test share
    one gallery, stored once). The directory is built aside and moved into place: complete or absent.
    `output_dir` must be new, empty, or (with `overwrite`) a previous output of `tool`, and must not be or
    contain any of `protect` (the input data); see `modeling_spn4cir.storage.atomic_directory`.
    """
    output_dir = Path(output_dir)
    corpus_features = datasets.Features({**CORPUS_FEATURES, **(corpus_extra or {})})
    triplet_features = datasets.Features({**TRIPLET_FEATURES, **(triplet_extra or {})})
    shared_corpus = shared_corpus or {}
    # `datasets` cannot load a config without data files, nor an empty split
    if not splits:
        raise ValueError(f"Nothing to write to {output_dir}: the annotations hold no split with records.")
    empty = [split for split, data in splits.items() if split not in shared_corpus and not data.corpus]
    if empty:
        raise ValueError(f"Split(s) {empty} have no images (left) for {output_dir}; a dataset with an empty split "
                         "cannot be loaded. Check the annotations and images, or leave the split out.")
    if not corpus_only and not any(data.triplets for data in splits.values()):
        dropped = sum(data.skipped_triplets for data in splits.values())
        raise ValueError(f"No triplets to write to {output_dir}" + (f" ({dropped} dropped for missing or bad images)"
                         if dropped else "") + "; a dataset without triplets cannot be loaded. Check the annotations.")
    with atomic_directory(output_dir, tool=tool, overwrite=overwrite, protect=protect) as staging:
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
        (staging / "README.md").write_text(_readme({c: f for c, f in data_files.items() if f}, card))
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
    bad = [f"{split}: {len(data.bad_images)} ({', '.join(data.bad_images[:10])}{', ...' if len(data.bad_images) > 10 else ''})"
           for split, data in splits.items() if data.bad_images]
    note = f"\nImages that do not decode, left out with --skip_bad_images (their triplets are counted as dropped): " \
           f"{'; '.join(bad)}.\n" if bad else ""
    return "\n".join(rows) + "\n" + note


def select_splits(requested: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    requested = list(requested or available)
    unknown = [s for s in requested if s not in available]
    if unknown:
        raise ValueError(f"Unknown split(s) {unknown}; choose from {list(available)}.")
    return requested


def converter_main(build, doc: str, splits: Sequence[str] | None, argv=None, extra=None, source: str = "data_dir",
                   source_help: str | None = None) -> None:
    """The command line of a converter: `--{source} --output_dir [--splits ...] [--skip_missing_images]
    [--skip_bad_images] [--overwrite_output_dir]` (plus `extra(parser)` options, passed to `build` by name).
    `splits=None` (an image collection: no annotations, so no split to choose and no listed image to miss) leaves
    out `--splits` and `--skip_missing_images`."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(f"--{source}", required=True, help=source_help)
    parser.add_argument("--output_dir", required=True)
    if splits is not None:
        parser.add_argument("--splits", nargs="+", choices=list(splits))
        parser.add_argument("--skip_missing_images", action="store_true",
                            help="drop triplets whose images are missing (counted in the card) instead of failing")
    parser.add_argument("--skip_bad_images", action="store_true",
                        help="leave out images that do not decode and drop their triplets (counted) instead of failing")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="replace --output_dir when it holds a previous output of this converter (never other files)")
    if extra is not None:
        extra(parser)
    add_debug_flag(parser)
    args = vars(parser.parse_args(argv))
    out = build(args.pop(source), args.pop("output_dir"), **args)
    print(f"wrote {out}")
