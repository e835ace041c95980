"""Load a CIR dataset for training/evaluation: an official benchmark (converted once, then reused) or any
dataset directory / Hub id in the project schema."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets

from modeling_spn4cir.storage import (
    OutputDirError,
    OutputLockedError,
    file_stamp,
    sha256,
    wait_for_unlock,
)

# The official benchmarks, converted from their layout. Each is scored by the evaluation protocol of its own name, any
# other dataset by the generic "recall" protocol: names only here (the protocol objects, `trainers.evaluation`, are
# layer 2), and `trainers.evaluation.protocol_for` reads `default_protocol`.
BENCHMARKS = ("fashioniq", "cirr", "circo")


def default_protocol(dataset: str) -> str:
    """The name of the evaluation protocol (`trainers.evaluation.PROTOCOLS`) that scores `dataset`."""
    return dataset if dataset in BENCHMARKS else "recall"


@dataclass
class CIRData:
    """Splits of the two configs, the evaluation protocol's name, and whether annotated captions are joined."""

    name: str
    triplets: datasets.DatasetDict
    corpus: datasets.DatasetDict
    protocol: str
    join_annotated_captions: bool
    path: str | None = None  # the (converted) dataset directory or Hub id


def _tree_fingerprint(root: Path) -> str:
    """Hash of every file's relative path and stamp (size, mtime, ctime, inode: `modeling_spn4cir.storage.file_stamp`)
    under `root`: a converted copy is reused only while the official tree is unchanged (images added later, edited
    annotations -> a new conversion)."""
    files = (Path(directory, name) for directory, _, names in sorted(os.walk(root)) for name in sorted(names))
    stamps = (f"{file_stamp(path, path.relative_to(root).as_posix())}\n".encode() for path in files)
    return sha256(itertools.chain([str(root.resolve()).encode()], stamps))[:16]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where spn4cir keeps what it derives from your data (converted benchmarks, caches it cannot keep beside a
    read-only dataset): `cache_dir`, else `$SPN4CIR_CACHE`, else `~/.cache/spn4cir`."""
    return Path(cache_dir or os.environ.get("SPN4CIR_CACHE", Path.home() / ".cache" / "spn4cir"))
def is_project_dataset(path: str | os.PathLike) -> bool:
    """Whether the local directory `path` is a dataset in the project schema (a README with its configs, and a
    `corpus` folder), as the converters and `generate_triplets.py` write."""
    path = Path(path)
    return (path / "README.md").is_file() and (path / "corpus").is_dir()


def _converted_dir(name: str, data_dir: str, cache_dir: str | None) -> Path:
    data_dir = Path(data_dir)
    if is_project_dataset(data_dir) and (data_dir / "triplets").is_dir():
        return data_dir  # already in the project schema
    key = _tree_fingerprint(data_dir)
    out = cache_root(cache_dir) / f"{name}-{key}"
    if not (out / "README.md").exists():
        from . import circo, cirr, fashioniq

        builder = {"fashioniq": fashioniq.build_fashioniq, "cirr": cirr.build_cirr, "circo": circo.build_circo}[name]
        try:
            builder(data_dir, out)
        except (OutputLockedError, OutputDirError):
            # another process (e.g. another rank of this run) converts or converted the same tree: use its result
            print(f"waiting for another process converting {data_dir} into {out} ...")
            wait_for_unlock(out)
            if not (out / "README.md").exists():
                raise
    return out


def load_cir_data(dataset: str, data_dir: str | None = None, cache_dir: str | None = None,
                  protocol: str | None = None) -> CIRData:
    """`dataset`: `fashioniq`, `cirr`, `circo` (with `data_dir` in the official layout or already converted),
    or a directory / Hub id in the project schema. An image collection without triplets (`datasets_scripts.images`,
    config `corpus` only) has no triplet splits (`triplets` is an empty `DatasetDict`)."""
    if dataset in BENCHMARKS:
        if data_dir is None:
            raise ValueError(f"--dataset {dataset} needs --data_dir (the official layout or a converted directory).")
        path = str(_converted_dir(dataset, data_dir, cache_dir))
    else:
        path = dataset
    corpus = datasets.load_dataset(path, "corpus")
    has_triplets = "triplets" in datasets.get_dataset_config_names(path)
    triplets = datasets.load_dataset(path, "triplets") if has_triplets else datasets.DatasetDict()
    return CIRData(dataset, triplets, corpus, protocol or default_protocol(dataset), dataset == "fashioniq",
                   path)


def load_extra_corpus(spec: str, data: CIRData, default_split: str = "train") -> tuple[datasets.Dataset, str]:
    """The corpus of `DATASET[:SPLIT]` (`--bank_extra_images`) and its name (`"DATASET:SPLIT"`): the training
    dataset's own corpus when DATASET is `data`'s name or path (FashionIQ / CIRR: every image of the split file,
    so its images in no triplet are the extra negatives), else any directory / Hub id in the project schema.
    SPLIT defaults to `default_split`. A corpus without `image_id`s is an error naming the fix."""
    name, sep, split = spec.rpartition(":")
    if not sep or not name or "/" in split or "\\" in split:  # no split given (a path may hold a drive's colon)
        name, split = spec, default_split
    if name in (data.name, data.path):
        corpora = data.corpus
    elif name in BENCHMARKS:
        raise ValueError(f"--bank_extra_images {spec}: only the training dataset ({data.name}) is converted here; "
                         f"pass {name}'s converted directory (its README.md and corpus/ folder) instead.")
    else:
        corpora = datasets.load_dataset(name, "corpus")
    if split not in corpora:
        raise ValueError(f"--bank_extra_images {spec}: the corpus has no split {split!r}; it has {sorted(corpora)}.")
    corpus = corpora[split]
    missing = [column for column in ("image_id", "image") if column not in corpus.column_names]
    if missing:
        raise ValueError(f"--bank_extra_images {spec}: its corpus has no {' or '.join(missing)} column "
                         f"(columns: {corpus.column_names}), so its images share no id scheme with the triplets'. "
                         "Convert the images into the project schema first (python -m datasets_scripts.images "
                         "--images DIR for an image collection, python -m datasets_scripts.custom "
                         "--all_images_in_corpus for a custom dataset).")
    return corpus, f"{name}:{split}"


def load_extra_corpora(specs: Sequence[str], data: CIRData, default_split: str = "train"
                       ) -> tuple[list[datasets.Dataset], list[str], str]:
    """The corpora of several `--bank_extra_images` sources (e.g. CIRR's train split plus a corpus of the COCO
    images the original appends to CIRR's bank, made with `datasets_scripts.images`), their ids in order and one
    name for them all (`"cirr:train+coco"`). An id held by two sources would leave one of its images out, so it is
    an error naming both sources."""
    corpora, names, owner, ids = [], [], {}, []
    for spec in specs:
        corpus, name = load_extra_corpus(spec, data, default_split)
        for image_id in corpus["image_id"]:
            if image_id in owner:
                raise ValueError(
                    f"--bank_extra_images: image id {image_id!r} is in both {owner[image_id]} and {name}, so one of "
                    "its images would be left out. Pass each source once, or give one corpus ids of its own (a "
                    "prefix) when converting it.")
            owner[image_id] = name
            ids.append(image_id)
        corpora.append(corpus)
        names.append(name)
    return corpora, ids, "+".join(names)


@dataclass
class TrainingTriplets:
    """The triplets `--train_dataset` trains on, the corpora their images come from, and the sources' names."""

    triplets: datasets.Dataset
    corpora: list[datasets.Dataset]
    sources: list[str]


def load_training_triplets(sources: Sequence[str], split: str = "train",
                           columns: Sequence[str] = ("reference_id", "target_id", "modification_texts", "source"),
                           ) -> TrainingTriplets:
    """The `split` triplets of several datasets in the project schema (directories or Hub ids: e.g. the generated
    triplets of `examples/generate_triplets.py`), concatenated in order with their core `columns`, and each one's
    `split` corpus (the images they use). A source without triplets in `split` (an image collection, a dataset of
    other splits) is an error naming it and the fix."""
    if not sources:
        raise ValueError("--train_dataset needs at least one dataset (a directory or Hub id in the project schema).")
    parts, corpora = [], []
    for source in sources:
        data = load_cir_data(source)
        if split not in data.triplets or len(data.triplets[split]) == 0:
            has = sorted(data.triplets) or "none (an image collection: caption and pair it first)"
            raise ValueError(f"--train_dataset {source}: it has no {split!r} triplets to train on (triplet splits: "
                             f"{has}). Pass the output of examples/generate_triplets.py (or another dataset with "
                             f"triplets), or choose the split with --train_split.")
        if split not in data.corpus:
            raise ValueError(f"--train_dataset {source}: its triplets' images are not there (no {split!r} corpus; "
                             f"corpus splits: {sorted(data.corpus)}); write the dataset again with its corpus.")
        triplets = data.triplets[split].select_columns(list(columns))
        parts.append(triplets if not parts else triplets.cast(parts[0].features))
        corpora.append(data.corpus[split])
    triplets = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return TrainingTriplets(triplets, corpora, [str(s) for s in sources])
