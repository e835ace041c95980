"""The candidate bank of SPN's stage 2: every unique training image encoded once by the frozen towers.

Two tensors per image: the target embedding (`get_target_embeds`, the negatives and positives of the loss)
and the reference features (`get_reference_features`, what the query side consumes). A stored bank carries a
JSON fingerprint of everything that determines it — the frozen towers' weights, the image ids, the images'
bytes, the image processor, the storage dtype and the shard size. A stored bank is reused only when the
fingerprint matches; otherwise it is rebuilt and the log says why. (The original reuses any file at
`--bank_path`, even one built by another model.)

Token-level reference features are large (BLIP4CIR: 577 x 768 per image, 20k images = 17.7 GB in fp16), so a
bank stored in `bank_dir` is a set of shards, each a contiguous block of `shard_size` images:

    bank_dir/
        bank-00000.safetensors   {"target_embeds": [n0, ...], "reference_features": [n0, ...]}
        bank-00000.json          the shard's manifest: its fingerprint, rows [start, stop), byte size, sha256
                                 and file metadata of the shard, its images' sha256 and their file metadata
        bank-00001.safetensors
        bank-00001.json
        ...
        bank.json                the bank's fingerprint, image ids and shard list; written last

Every file is written atomically, a shard before its manifest and `bank.json` after every shard, so a killed
build leaves only complete shards behind; the next build reuses each shard whose manifest fingerprint matches
(and whose bytes still hash to the manifest's sha256) and encodes only the others. A shard's fingerprint
covers only its own images, so a changed image re-encodes the shard that holds it, not the bank.

A warm start reads no image byte and hashes no shard: each manifest keeps its images' sha256 under a stamp of
their file metadata (`ImageStore.stamps`: size, mtime, ctime, inode), and its shard file's own metadata. An image
whose stamp changed is hashed again (a touched file keeps its shard, a rewritten one re-encodes it); a shard file
whose metadata changed is verified against its sha256 (a file copied in from another model's bank is refused). A
missing, truncated, foreign or unreadable shard and a malformed `bank.json` or manifest are rebuilt, never a
crash, and the log says why.

Under `torch.distributed` every rank calls `load_or_build_candidate_bank`: rank 0 reads the stamps and decides
what is reusable, the hashing and the encoding of the shards to build are split over the ranks (each writes its
own shards), and every rank then maps the whole bank.

Loaded, the target embeddings are one in-memory tensor (they are small, and the loss keeps them as a buffer);
the reference features stay on disk behind a read-only memory-mapped view ([`ShardedRows`]) that reads the
rows a batch asks for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from datasets_scripts.image_store import ImageStore, encode_images
from modeling_spn4cir.atomic import atomic_write_bytes, atomic_write_json, file_sha256, file_stat
from modeling_spn4cir.distributed import world

logger = logging.getLogger(__name__)

BANK_FORMAT = 2
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_SHARD_SIZE = 1024
KEYS = ("target_embeds", "reference_features")
_BANK_FILE = re.compile(r"(bank-\d+\.(safetensors|json)|bank\.safetensors|\.bank[-.].*)")


def shard_name(k: int) -> str:
    return f"bank-{k:05d}.safetensors"


class ShardedRows:
    """Read-only rows of one tensor stored across safetensors shards (row blocks), memory-mapped.

    `view[rows]` with a list / 1-D tensor of row indices (any order, repeats allowed), an int or a slice returns
    a tensor `[len(rows), ...]` in the order given; `.shape`, `.dtype`, `.ndim` and `len()` are those of the
    whole tensor; `to_tensor()` reads every row (the whole tensor in memory: mind its size). Only the requested
    rows are read. The shards are opened (mapped) when the view is made, so a later rebuild that replaces
    them does not change what the view reads; forked DataLoader workers share the maps, and a pickled view
    (spawned workers) reopens the files where it is unpickled.
    """

    def __init__(self, files: Sequence[str | Path], row_counts: Sequence[int], name: str,
                 row_shape: Sequence[int], dtype: torch.dtype):
        if len(files) != len(row_counts) or not files:
            raise ValueError("ShardedRows needs one row count per shard file, and at least one shard.")
        self.files = [str(f) for f in files]
        self.name = name
        self.dtype = dtype
        self.row_shape = tuple(int(s) for s in row_shape)
        self._starts = [0]
        for count in row_counts:
            self._starts.append(self._starts[-1] + int(count))
        # opened now: the maps keep reading these files even if a later build replaces them in the directory
        self._handles: dict[int, object] = {}
        for k in range(len(self.files)):
            self._slice(k)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self._starts[-1], *self.row_shape))

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    def __len__(self) -> int:
        return self._starts[-1]

    def __repr__(self) -> str:
        return f"ShardedRows({self.name!r}, shape={tuple(self.shape)}, dtype={self.dtype}, shards={len(self.files)})"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def _slice(self, k: int):
        handle = self._handles.get(k)
        if handle is None:
            try:
                handle = safe_open(self.files[k], framework="pt")
            except Exception as error:
                raise RuntimeError(f"cannot read candidate bank shard {self.files[k]}: {error}. Delete the bank's "
                                   "bank.json to rebuild the bad shards.") from error
            self._handles[k] = handle
        return handle.get_slice(self.name)

    def _rows(self, index) -> torch.Tensor:
        n = len(self)
        if isinstance(index, slice):
            return torch.arange(n)[index].contiguous()
        rows = torch.as_tensor(index) if not (isinstance(index, list) and not index) else torch.empty(0, dtype=torch.long)
        if rows.dtype == torch.bool or rows.is_floating_point() or rows.ndim > 1:
            raise TypeError(f"ShardedRows is indexed by row indices (int, slice, list or 1-D integer tensor), got {index!r}.")
        rows = rows.reshape(-1).long()
        if rows.numel() and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"row index out of range for a bank of {n} rows")
        return torch.where(rows < 0, rows + n, rows)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, tuple):
            raise TypeError("ShardedRows supports row indexing only; index the returned tensor further.")
        single = not isinstance(index, (slice, list)) and torch.as_tensor(index).ndim == 0
        rows = self._rows(index)
        out = torch.empty((rows.numel(), *self.row_shape), dtype=self.dtype)
        if rows.numel():
            starts = torch.tensor(self._starts)
            shard_of = torch.searchsorted(starts, rows, right=True) - 1
            for k in shard_of.unique().tolist():
                where = (shard_of == k).nonzero().squeeze(1)
                local = rows[where] - self._starts[k]
                wanted, inverse = local.unique(sorted=True, return_inverse=True)
                sl = self._slice(k)
                # contiguous runs of the wanted rows, each one read from the map
                breaks = ((wanted[1:] - wanted[:-1]) != 1).nonzero().squeeze(1) + 1
                bounds = [0, *breaks.tolist(), wanted.numel()]
                read = torch.cat([sl[int(wanted[a]):int(wanted[b - 1]) + 1] for a, b in pairwise(bounds)])
                out[where] = read[inverse].to(self.dtype)
        return out[0] if single else out

    def to_tensor(self) -> torch.Tensor:
        """Every row, in memory."""
        return self[:]


@dataclass
class CandidateBank:
    """`image_ids[i]` has target embedding `target_embeds[i]` (`[K, D]`, or `[K, Q, D]` for multi-vector
    families) and reference features `reference_features[i]` (whatever shape the family's
    `get_reference_features` returns per image: `[K, D]`, `[K, T, H]`, ...); `dedup_map` sends duplicate ids to
    their canonical id. `reference_features` is an in-memory tensor for a bank built without a directory and a
    memory-mapped [`ShardedRows`] view for a stored one; both give `reference_features[list_of_rows] -> Tensor`."""

    image_ids: list[str]
    target_embeds: torch.Tensor
    reference_features: torch.Tensor | ShardedRows
    fingerprint: dict
    dedup_map: dict[str, str] = field(default_factory=dict)
    image_digests: list[str] | None = None  # sha256 of each image's stored bytes (row order)

    def __post_init__(self):
        self._index = {image_id: i for i, image_id in enumerate(self.image_ids)}

    def __len__(self) -> int:
        return len(self.image_ids)

    def canonical(self, image_id: str) -> str:
        return self.dedup_map.get(image_id, image_id)

    def indices(self, image_ids: Sequence[str]) -> list[int]:
        try:
            return [self._index[self.canonical(i)] for i in image_ids]
        except KeyError as error:
            raise KeyError(f"image {error.args[0]!r} is not in the candidate bank; was it built from these triplets?") from None


def bank_image_ids(triplet_sets: Iterable, dedup_map: dict[str, str] | None = None) -> list[str]:
    """Unique canonical ids of every reference and target the training triplets use, in first-seen order."""
    dedup_map = dedup_map or {}
    ids: dict[str, None] = {}
    for triplets in triplet_sets:
        for column in ("reference_id", "target_id"):
            for image_id in triplets[column]:
                if image_id is not None:
                    ids.setdefault(dedup_map.get(image_id, image_id))
    return list(ids)


def _sha256(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------ processes
def _broadcast(obj):
    """Rank 0's `obj` on every rank."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj) -> list:
    """Every rank's `obj`, in rank order."""
    world_size = world()[1]
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------- fingerprints
def tower_fingerprint(model) -> str:
    """sha256 of the frozen target-side weights (`model.target_side_state_dict()`): what makes two banks' rows equal."""
    state = model.target_side_state_dict()
    return _sha256(
        name.encode() + str(tuple(t.shape)).encode() + t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        for name, t in sorted(state.items())
    )


def processor_fingerprint(image_processor) -> str:
    processor = image_processor.to_json_string() if hasattr(image_processor, "to_json_string") else repr(image_processor)
    return _sha256([processor.encode()])


def _common(model, image_processor, dtype: str, shard_size: int) -> dict:
    return {
        "format": BANK_FORMAT,
        "model_class": type(model).__name__,
        "frozen_tower_weights": tower_fingerprint(model),
        "image_processor": processor_fingerprint(image_processor),
        "dtype": dtype,
        "shard_size": shard_size,
    }


def _ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def _fingerprints(common: dict, image_ids: list[str], digests: list[str],
                  ranges: list[tuple[int, int]]) -> tuple[dict, list[dict]]:
    """The bank's fingerprint and one per shard (the same model fields, the shard's own ids and image bytes)."""
    raw = [bytes.fromhex(d) for d in digests]
    fingerprint = {
        **common,
        "image_ids": _sha256(i.encode() + b"\0" for i in image_ids),
        "image_content": _sha256(raw),
        "num_images": len(image_ids),
    }
    shards = [{**common, "shard": k, "start": start, "stop": stop,
               "image_ids": _sha256(i.encode() + b"\0" for i in image_ids[start:stop]),
               "image_content": _sha256(raw[start:stop])}
              for k, (start, stop) in enumerate(ranges)]
    return fingerprint, shards


def _stamp(images: ImageStore, image_ids: Sequence[str]) -> str | None:
    """A cheap key of a block of images (ids + file metadata, no byte read), or None when some image has none."""
    stamps = images.stamps(image_ids)
    if any(s is None for s in stamps):
        return None
    return _sha256(f"{i}\0{s}\0".encode() for i, s in zip(image_ids, stamps))


def _shard_digests(images: ImageStore, image_ids: list[str], ranges, manifests: list[dict | None]):
    """Every image's content digest, read from a shard manifest where the shard's images are unchanged (same
    stamp: no byte is read on a warm start), else hashed from the images' bytes, with the hashing split over the
    ranks. The stamps are computed on rank 0 and broadcast. Returns (digests per shard, stamp per shard)."""
    rank, world_size = world()
    plan = None
    if rank == 0:
        stamps = [_stamp(images, image_ids[a:b]) for a, b in ranges]
        cached = {}
        for k, manifest in enumerate(manifests):
            if not manifest:
                continue
            digests = manifest.get("image_digests")
            if (stamps[k] is not None and manifest.get("stamp") == stamps[k] and isinstance(digests, list)
                    and len(digests) == ranges[k][1] - ranges[k][0]):
                cached[k] = digests
        plan = (stamps, cached)
    stamps, cached = _broadcast(plan)
    to_hash = [k for k in range(len(ranges)) if k not in cached]
    mine = {k: images.digests(image_ids[slice(*ranges[k])]) for k in to_hash[rank::world_size]}
    for part in _all_gather(mine):
        cached.update(part)
    return [cached[k] for k in range(len(ranges))], stamps


def compute_fingerprint(model, image_ids: Sequence[str], images: ImageStore, image_processor, dtype: str,
                        shard_size: int = DEFAULT_SHARD_SIZE) -> dict:
    """The fingerprint of the bank of `image_ids` (reads every image's bytes; a stored bank caches them)."""
    image_ids = list(image_ids)
    return _fingerprints(_common(model, image_processor, dtype, shard_size), image_ids,
                         images.digests(image_ids), _ranges(len(image_ids), shard_size))[0]


# ---------------------------------------------------------------------------------------- shards
def _check_shard(path: Path, entry: dict, dtype: str) -> tuple[str | None, bool]:
    """(why the stored shard `path` does not hold rows `[entry.start, entry.stop)` as `entry` says, or None;
    whether its file metadata changed since it was written). Cheap checks (size, header, shapes, dtype) always;
    the sha256 of its bytes when the file is not the one written (its size, mtime, ctime or inode differ: copied
    over, replaced, restored from a backup) — a bank file of another model is never used unverified."""
    try:
        if not path.exists():
            return "it is missing", False
        size = path.stat().st_size
        if size != entry.get("bytes"):
            return f"it has {size} bytes, its manifest says {entry.get('bytes')} (truncated or overwritten)", False
        rows = int(entry["stop"]) - int(entry["start"])
        with safe_open(str(path), framework="pt") as f:
            if set(f.keys()) != set(KEYS):
                return f"it holds {sorted(f.keys())}, not {list(KEYS)}", False
            for key in KEYS:
                sl = f.get_slice(key)
                if sl.get_shape()[:1] != [rows]:
                    return f"its {key} have shape {sl.get_shape()}, not {rows} rows", False
                if list(sl.get_shape()[1:]) != list(entry.get(f"{key}_row_shape", sl.get_shape()[1:])):
                    return f"its {key} rows have shape {sl.get_shape()[1:]}, not {entry[f'{key}_row_shape']}", False
                if _dtype_name(sl.get_dtype()) != dtype:
                    return f"its {key} are {sl.get_dtype()}, not {dtype}", False
        if entry.get("stat") == file_stat(path):
            return None, False
        if file_sha256(path) != entry.get("sha256"):
            return "its bytes do not match the sha256 written with it (another bank's file, or corrupt)", True
        return None, True
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:  # a bad header or manifest
        return f"it cannot be read or its manifest is malformed ({type(error).__name__}: {error})", False


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _dtype_name(safetensors_dtype: str) -> str:
    return _SAFETENSORS_DTYPES.get(safetensors_dtype, safetensors_dtype)


def _load_sharded(bank_dir: Path, shards: list[dict], image_ids: list[str], fingerprint: dict, dtype: str,
                  dedup_map: dict[str, str] | None, digests: list[str]) -> CandidateBank:
    files = [bank_dir / s["file"] for s in shards]
    targets = []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            targets.append(f.get_tensor("target_embeds"))
    reference = ShardedRows(files, [s["stop"] - s["start"] for s in shards], "reference_features",
                            shards[0]["reference_features_row_shape"], DTYPES[dtype])
    return CandidateBank(image_ids, torch.cat(targets), reference, fingerprint, dict(dedup_map or {}), digests)


def _read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None if it is missing, unreadable, not JSON or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _manifest_name(k: int) -> str:
    return f"bank-{k:05d}.json"


def _summary(entry: dict) -> dict:
    """A shard's entry in bank.json: its manifest without the fingerprint and the image digests."""
    return {k: v for k, v in entry.items() if k not in ("fingerprint", "image_digests", "stamp")}


def _encode(model, images, image_ids, image_processor, batch_size, num_workers, dtype, show_progress_bar, desc):
    return encode_images(
        model.get_target_embeds_and_reference_features, images, image_ids, image_processor, batch_size,
        num_workers, device=next(model.parameters()).device, dtype=DTYPES[dtype],
        show_progress_bar=show_progress_bar, desc=desc,
    )


def _usable_shards(bank_dir: Path, fingerprint: dict, shard_fps: list[dict], manifests: list[dict | None],
                   image_ids: list[str], dtype: str) -> tuple[list[dict | None], list[int]]:
    """(rank 0) The manifest of every stored shard that can be reused as it is (None for the others, which are
    encoded again), and the shards whose file metadata changed but whose bytes verified (their stat is updated).
    Logs why whatever is not reused is not."""
    meta_path = bank_dir / "bank.json"
    stored = _read_json(meta_path)
    if stored is None and meta_path.exists():
        logger.warning("Rebuilding the candidate bank in %s: %s cannot be read (not a JSON object).", bank_dir, meta_path)
    elif stored is not None:
        stored_fp = stored.get("fingerprint") if isinstance(stored.get("fingerprint"), dict) else {}
        changed = [k for k in fingerprint if stored_fp.get(k) != fingerprint[k]]
        if not changed and stored.get("image_ids") != image_ids:
            changed = ["image id order"]
        if changed:
            logger.warning("Rebuilding the candidate bank in %s: %s changed since it was built.", bank_dir,
                           ", ".join(changed))
    entries: list[dict | None] = []
    restamped: list[int] = []
    for k, (shard_fp, manifest) in enumerate(zip(shard_fps, manifests)):
        path = bank_dir / shard_name(k)
        if manifest is None or manifest.get("fingerprint") != shard_fp:
            if path.exists() or manifest is not None:
                logger.info("Candidate bank shard %s was built from other images, towers or settings; encoding it "
                            "again.", path)
            entries.append(None)
            continue
        why, changed = _check_shard(path, manifest, dtype)
        if why is not None:
            logger.warning("Rebuilding candidate bank shard %s: %s.", path, why)
            entries.append(None)
            continue
        if changed:
            manifest = {**manifest, "stat": file_stat(path)}
            restamped.append(k)
        entries.append(manifest)
    return entries, restamped


def load_or_build_candidate_bank(
    model,
    images: ImageStore,
    image_ids: Sequence[str],
    image_processor,
    bank_dir: str | Path | None = None,
    dtype: str = "float32",
    batch_size: int = 64,
    dedup_map: dict[str, str] | None = None,
    show_progress_bar: bool = True,
    num_workers: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> CandidateBank:
    """Encode `image_ids` with the frozen towers (eval mode, no grad, batched, progress bar), or load them.

    Without `bank_dir` the bank is two in-memory tensors. With it, the bank is stored there as shards of
    `shard_size` images (see the module docstring): a bank whose fingerprint matches is loaded (target
    embeddings in memory, reference features memory-mapped), an interrupted or outdated build is resumed,
    encoding only the shards that are missing, corrupt or built from something else.

    Under `torch.distributed`, every rank must call this: the work is split over the ranks (each hashes and
    encodes its share of the shards, rank 0 decides what is reused), so W processes build about W times faster and
    none waits idle in a barrier. With a `bank_dir`, the ranks must share its file system.
    """
    if dtype not in DTYPES:
        raise ValueError(f"bank dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    if int(shard_size) < 1:
        raise ValueError(f"shard_size must be a positive number of images, got {shard_size!r}.")
    shard_size = int(shard_size)
    image_ids = list(image_ids)
    if not image_ids:
        raise ValueError("No images for the candidate bank: the training triplets name none.")
    images.check(image_ids, "bank images")
    rank, world_size = world()
    bank_dir = Path(bank_dir) if bank_dir is not None else None
    ranges = _ranges(len(image_ids), shard_size)
    common = _broadcast(_common(model, image_processor, dtype, shard_size) if rank == 0 else None)
    manifests: list[dict | None] = [None] * len(ranges)
    if bank_dir is not None and rank == 0:
        manifests = [_read_json(bank_dir / _manifest_name(k)) for k in range(len(ranges))]
    digests, stamps = _shard_digests(images, image_ids, ranges, manifests)
    fingerprint, shard_fps = _fingerprints(common, image_ids, [d for ds in digests for d in ds], ranges)
    all_digests = [d for ds in digests for d in ds]

    was_training = model.training
    if bank_dir is None:
        start, stop = len(image_ids) * rank // world_size, len(image_ids) * (rank + 1) // world_size
        model.eval()
        try:
            part = (_encode(model, images, image_ids[start:stop], image_processor, batch_size, num_workers, dtype,
                            show_progress_bar and rank == 0, "candidate bank") if stop > start else None)
        finally:
            model.train(was_training)
        parts = [p for p in _all_gather(part) if p is not None]
        target, reference = (torch.cat([p[i] for p in parts]) for i in range(2))
        return CandidateBank(image_ids, target, reference, fingerprint, dict(dedup_map or {}), all_digests)

    meta_path = bank_dir / "bank.json"
    decision = None
    if rank == 0:
        entries, restamped = _usable_shards(bank_dir, fingerprint, shard_fps, manifests, image_ids, dtype)
        decision = (entries, restamped)
    entries, restamped = _broadcast(decision)
    todo = [k for k, e in enumerate(entries) if e is None]
    if rank == 0:
        if todo and len(todo) < len(ranges):
            logger.info("Resuming the candidate bank build in %s: %d of %d shards are usable, encoding the other %d%s.",
                        bank_dir, len(ranges) - len(todo), len(ranges), len(todo),
                        f" over {world_size} processes" if world_size > 1 else "")
        for k, entry in enumerate(entries):  # image digests re-hashed under new stamps: remember them
            if entry is not None and (k in restamped or (stamps[k] is not None and entry.get("stamp") != stamps[k])):
                entries[k] = {**entry, "stamp": stamps[k], "image_digests": digests[k]}
                atomic_write_json(bank_dir / _manifest_name(k), entries[k])
        if todo:
            # bank.json goes first and comes back last: a crash in between leaves no valid bank behind, only
            # shards, each complete (atomic) and described by its manifest, which the next build reuses.
            meta_path.unlink(missing_ok=True)

    mine: dict[int, dict] = {}
    if todo:
        bank_dir.mkdir(parents=True, exist_ok=True)
        own = todo[rank::world_size]
        model.eval()
        try:
            for n, k in enumerate(own):
                fp = shard_fps[k]
                where = f" (rank {rank} of {world_size})" if world_size > 1 else ""
                target, reference = _encode(model, images, image_ids[fp["start"]:fp["stop"]], image_processor,
                                            batch_size, num_workers, dtype, show_progress_bar and rank == 0,
                                            f"candidate bank shard {n + 1}/{len(own)}{where}")
                data = save({"target_embeds": target.contiguous(), "reference_features": reference.contiguous()})
                entry = {"file": shard_name(k), "start": fp["start"], "stop": fp["stop"], "bytes": len(data),
                         "sha256": hashlib.sha256(data).hexdigest(),
                         "target_embeds_row_shape": list(target.shape[1:]),
                         "reference_features_row_shape": list(reference.shape[1:]), "fingerprint": fp}
                del target, reference
                (bank_dir / _manifest_name(k)).unlink(missing_ok=True)
                atomic_write_bytes(bank_dir / shard_name(k), data)
                del data
                entry |= {"stat": file_stat(bank_dir / shard_name(k)), "stamp": stamps[k],
                          "image_digests": digests[k]}
                atomic_write_json(bank_dir / _manifest_name(k), entry)
                mine[k] = entry
        finally:
            model.train(was_training)
    for part in _all_gather(mine):
        for k, entry in part.items():
            entries[k] = entry

    if rank == 0 and (todo or restamped or not meta_path.exists()):
        # stale files of earlier builds: shards beyond this bank's count, the single-file format, orphaned temps
        keep = {shard_name(k) for k in range(len(entries))} | {_manifest_name(k) for k in range(len(entries))}
        for path in bank_dir.iterdir():
            if path.is_file() and path.name not in keep and _BANK_FILE.fullmatch(path.name):
                path.unlink(missing_ok=True)
        atomic_write_json(meta_path, {"fingerprint": fingerprint, "image_ids": image_ids,
                                      "shards": [_summary(e) for e in entries]})
    elif rank == 0:
        logger.info("Loaded candidate bank of %d images (%d shards) from %s", len(image_ids), len(entries), bank_dir)
    return _load_sharded(bank_dir, entries, image_ids, fingerprint, dtype, dedup_map, all_digests)
