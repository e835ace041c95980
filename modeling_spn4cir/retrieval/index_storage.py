"""A gallery index on disk, and its resumable build: both keep the target embeddings in a [`ShardStore`] of
safetensors shards.

A saved index is a directory (written aside and moved into place by `CIRIndex.save`, so a kill leaves the old
index or none):

    index.json                      format, the model fingerprint, image ids, file paths, sources, dtype, row shape,
                                    and the shard list (rows, bytes, sha256 of each file)
    embeddings-00000.safetensors    rows [0, 65536) of the target embeddings `[N, D]` or `[N, Q, D]`
    embeddings-00000.json           its manifest: rows, bytes, sha256, file stamp, row shape, and the fingerprint of
    ...                             what it holds (the model's target side, the dtype, its images' ids)
    .spn4cir_output.json            the marker of a `CIRIndex` output directory

Loading checks every shard against its manifest and `index.json` (the shard store's rule: size, rows, dtype and
row shape always, the sha256 when the file's stamp is not the one written), so a swapped, truncated or foreign
embeddings file is refused naming the file, and so is an embedding that is not finite.

A build with a `cache_dir` encodes the gallery into a store of fixed-size shards there, fingerprinted by the
target side, the dtype and each shard's images (ids and bytes, `image_blocks`): a killed build resumes with the
shards it finished, and a changed image re-encodes only its shard.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..image_blocks import content_sha256, ids_sha256, plan_image_shards
from ..image_store import ImageStore, encode_images
from ..storage import SafetensorsCodec, ShardPlan, ShardStore, atomic_write_json, fixed_size_blocks, json_sha256

INDEX_FORMAT = "spn4cir-gallery-index/2"
BUILD_FORMAT = "spn4cir-gallery-build/1"
INDEX_FILE = "index.json"
STORE_NAME = "embeddings"
SHARD_ROWS = 2**16  # rows per embeddings file of a saved index
BUILD_SHARD_SIZE = 4096  # images per shard of a build cache: what a killed build loses at most
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REBUILD = "rebuild the index (`python examples/retrieve.py index ... --overwrite_output_dir`, or CIRIndex.build)"


class IndexFileError(ValueError):
    """A saved index whose files cannot be used as they are (another format, a damaged or foreign file)."""


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"gallery embeddings are stored as {sorted(DTYPES)}, not {name}; convert them first "
                         "(e.g. embeddings.float()).")
    return name


def embeddings_store(directory: str | Path, dtype: torch.dtype, what: str = "gallery index") -> ShardStore:
    return ShardStore(directory, STORE_NAME, SafetensorsCodec(["embeddings"], dtype), what)


def _plans(fingerprint: dict, dtype: str, image_ids: Sequence[str], shard_rows: int) -> list[ShardPlan]:
    """The shards of a saved index; each one's fingerprint names the target side, the dtype and its images."""
    target_side = {k: v for k, v in fingerprint.items() if k != "model"}
    return [ShardPlan(a, b, {"format": INDEX_FORMAT, **target_side, "dtype": dtype, "shard": k,
                             "image_ids": ids_sha256(image_ids[a:b])})
            for k, (a, b) in enumerate(fixed_size_blocks(len(image_ids), shard_rows))]


def write_index(directory: Path, embeddings: torch.Tensor, image_ids: list[str], paths: list[str | None],
                fingerprint: dict, sources: list[dict]) -> dict:
    """Write an index (`embeddings` `[N, ...]` with their ids, files, fingerprint and sources) into the empty
    directory `directory`: the shards of `SHARD_ROWS` rows, then `index.json`, whose fields are returned."""
    dtype, shard_rows = dtype_name(embeddings.dtype), SHARD_ROWS
    store = embeddings_store(directory, embeddings.dtype)
    embeddings = embeddings.detach().cpu()
    shards = [store.write(k, plan, {"embeddings": embeddings[plan.start:plan.stop].contiguous()})
              for k, plan in enumerate(_plans(fingerprint, dtype, image_ids, shard_rows))]
    listed = [{key: s.manifest[key] for key in ("file", "start", "stop", "bytes", "sha256")} for s in shards]
    meta = {"format": INDEX_FORMAT, "fingerprint": fingerprint, "num_images": len(image_ids),
            "embedding_shape": list(embeddings.shape[1:]), "dtype": dtype, "shard_rows": shard_rows, "shards": listed,
            "sources": sources, "image_ids": image_ids, "paths": paths}
    atomic_write_json(Path(directory) / INDEX_FILE, meta, indent=1)
    return meta


def embeddings_digest(meta: dict) -> str:
    """One digest of a saved index's embeddings (of its shards' sha256, which loading checks against the files):
    what a FAISS index saved beside them records as built from."""
    return json_sha256([shard["sha256"] for shard in meta["shards"]])


def _read_meta(path: Path) -> dict:
    meta_file = path / INDEX_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a gallery index (it has no {INDEX_FILE}); build one with "
                                "`python examples/retrieve.py index` or CIRIndex.build(...).save().")
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as error:
        raise IndexFileError(f"{meta_file} is not JSON ({error}); {REBUILD}.") from error
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise IndexFileError(f"{meta_file} has format {found!r}, this code reads {INDEX_FORMAT!r} (an index saved by "
                             f"an earlier version keeps its embeddings in one file); {REBUILD}.")
    if meta.get("dtype") not in DTYPES:
        raise IndexFileError(f"{meta_file} says the embeddings are {meta.get('dtype')!r}, not one of "
                             f"{sorted(DTYPES)}; {REBUILD}.")
    problem = _meta_problem(meta)
    if problem is not None:
        raise IndexFileError(f"{meta_file} {problem}: it is damaged or was edited; {REBUILD}.")
    return meta


_FIELDS = {"fingerprint": dict, "image_ids": list, "paths": list, "num_images": int, "embedding_shape": list,
           "shard_rows": int, "shards": list, "sources": list}
_JSON_NAMES = {dict: "an object", list: "an array", int: "a whole number", str: "a string"}
_SHARD_FIELDS = {"file": str, "start": int, "stop": int, "bytes": int, "sha256": str}


def _is(value, kind) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def _meta_problem(meta: dict) -> str | None:
    """What makes an `index.json` of the current format unusable (a missing or mistyped field), or None."""
    for key, kind in _FIELDS.items():
        if not _is(meta.get(key), kind):
            return f"has no valid {key!r} field ({_JSON_NAMES[kind]} expected, found {meta.get(key)!r:.60})"
    ids, paths = meta["image_ids"], meta["paths"]
    if len(paths) != len(ids) or meta["num_images"] != len(ids):
        return f"lists {len(ids)} image ids, {len(paths)} paths and num_images {meta['num_images']}"
    if not all(_is(i, str) for i in ids) or not all(p is None or _is(p, str) for p in paths):
        return "lists image ids that are not strings or paths that are neither strings nor null"
    shape = meta["embedding_shape"]
    if len(shape) not in (1, 2) or not all(_is(d, int) and d > 0 for d in shape) or meta["shard_rows"] < 1:
        return f"has an embedding shape {shape} or shard size {meta['shard_rows']} no index has"
    if not all(_is(f, str) for f in (meta["fingerprint"].get(k) for k in ("model_class", "target_side_weights",
                                                                          "image_processor"))):
        return "has a fingerprint without its model class, target-side weights or image processor"
    for n, shard in enumerate(meta["shards"]):
        if not _is(shard, dict) or not all(_is(shard.get(k), kind) for k, kind in _SHARD_FIELDS.items()):
            return f"lists an embeddings file (entry {n} of 'shards') without its {sorted(_SHARD_FIELDS)}"
    if not all(_is(source, dict) for source in meta["sources"]):
        return "lists sources that are not objects"
    return None


def nonfinite_rows(embeddings: torch.Tensor, chunk: int = 2**14) -> list[int]:
    """The rows of `embeddings` `[N, ...]` holding a NaN or inf (checked in chunks: no `[N, ...]` mask at once)."""
    rows = []
    for start in range(0, embeddings.shape[0], chunk):
        part = embeddings[start:start + chunk]
        bad = ~torch.isfinite(part).flatten(1).all(dim=1)
        rows += (torch.nonzero(bad).flatten() + start).tolist()
    return rows


def _check_finite(embeddings: torch.Tensor, file: Path, image_ids: Sequence[str]) -> None:
    rows = nonfinite_rows(embeddings)
    if rows:
        raise IndexFileError(f"{file} holds {len(rows)} embeddings with NaN or inf (first: image {image_ids[rows[0]]!r}"
                             f"); the model that built it produced non-finite outputs: check its weights and "
                             f"{REBUILD}.")


def _shard_problem(store: ShardStore, k: int, plan: ShardPlan, listed: dict) -> str | None:
    manifest = store.manifest(k)
    why = store.verify(k, plan, manifest)
    if why is None and manifest.get("sha256") != listed.get("sha256"):
        why = f"its manifest's sha256 is not the one {INDEX_FILE} lists"
    return why


def read_index(path: str | Path, device=None, meta_only: bool = False) -> dict:
    """The fields of the index saved in `path` (as `write_index` wrote them) with its `embeddings` `[N, ...]` on
    `device`, every shard checked; an [`IndexFileError`] naming the file otherwise. `meta_only`: the fields of
    `index.json` alone (nothing checked beyond its format)."""
    path = Path(path)
    meta = _read_meta(path)
    if meta_only:
        return meta
    store = embeddings_store(path, DTYPES[meta["dtype"]])
    plans = _plans(meta["fingerprint"], meta["dtype"], meta["image_ids"], int(meta["shard_rows"]))
    if len(plans) != len(meta["shards"]) or meta["num_images"] != len(meta["image_ids"]):
        raise IndexFileError(f"{path / INDEX_FILE} lists {len(meta['shards'])} embeddings files for "
                             f"{len(meta['image_ids'])} images in shards of {meta['shard_rows']}; {REBUILD}.")
    parts = []
    for k, (plan, listed) in enumerate(zip(plans, meta["shards"])):
        why = _shard_problem(store, k, plan, listed)
        if why is not None:
            raise IndexFileError(f"{store.shard_path(k)} cannot be used: {why}. The index {path} is damaged or "
                                 f"holds another index's file; restore the file from the copy it came from, or "
                                 f"{REBUILD}.")
        part = store.codec.read(store.shard_path(k))["embeddings"]
        _check_finite(part, store.shard_path(k), meta["image_ids"][plan.start:plan.stop])
        parts.append(part)
    shape = (0, *meta["embedding_shape"])
    embeddings = torch.cat(parts) if parts else torch.empty(shape, dtype=DTYPES[meta["dtype"]])
    return {**meta, "embeddings": embeddings.to(device or "cpu")}


def build_cache(cache_dir: str | Path) -> ShardStore:
    """The store of a resumable index build in `cache_dir`; a directory holding other files is refused (the build
    writes its shards there and removes them once the index is saved: `ShardStore.remove`)."""
    store = embeddings_store(cache_dir, torch.float32, "gallery index build")
    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise FileExistsError(f"{cache_dir} is a file; an index build keeps its resumable shards in a directory there. "
                              "Move the file away, or write the index elsewhere.")
    foreign = store.foreign_files()
    if foreign:
        raise FileExistsError(f"{cache_dir} holds files that are not an index build's ({foreign[:5]}); the build keeps "
                              "its resumable shards there and deletes them once the index is saved. Move those files "
                              "away, or write the index elsewhere.")
    return store


def encode_with_cache(encode: Callable[[torch.Tensor], torch.Tensor], images: ImageStore, image_ids: list[str],
                      image_processor, settings: dict, cache_dir: str | Path, shard_size: int = BUILD_SHARD_SIZE,
                      **encoding) -> torch.Tensor:
    """`encode_images(encode, images, image_ids, image_processor, **encoding)` `[N, ...]`, built in the shard
    store `cache_dir` (see the module docstring) so that a killed build resumes. `settings`: what decides the
    embeddings besides the images (the target-side fingerprint). Under `torch.distributed` every rank must call
    this: the shards are split over the ranks, and every rank gets every row."""
    dtype = encoding.get("dtype", torch.float32)
    store = embeddings_store(cache_dir, dtype, "gallery index build")
    settings = {"format": BUILD_FORMAT, **settings, "dtype": dtype_name(dtype), "shard_size": int(shard_size)}
    shards = plan_image_shards(store, images, image_ids, int(shard_size), settings)
    fingerprint = {**settings, "image_ids": ids_sha256(image_ids), "image_content": content_sha256(shards.digests),
                   "num_images": len(image_ids)}

    def build(job) -> dict[str, torch.Tensor]:
        desc = f"{encoding.get('desc', 'gallery')} {job.label}".strip()
        rows = image_ids[job.plan.start:job.plan.stop]
        return {"embeddings": encode_images(encode, images, rows, image_processor, **{**encoding, "desc": desc})}

    held = store.sync(shards.plans, build, shards.manifests, fingerprint)
    return torch.cat([store.codec.read(shard.path)["embeddings"] for shard in held])


__all__ = ["INDEX_FORMAT", "INDEX_FILE", "IndexFileError", "build_cache", "encode_with_cache", "read_index",
           "write_index"]
