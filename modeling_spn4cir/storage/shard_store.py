"""A resumable, fingerprinted store of shards: the candidate bank, the caption cache and the de-duplication hashes
all keep their rows in one.

The rows of a sequence (images, in the caller's order) are split into blocks `[start, stop)`; the store holds one
shard per block, made by the caller's `build` function from the block's inputs. In a directory:

    <name>-00000.<ext>    the shard's payload (safetensors tensors, JSON lines of records: the store's codec)
    <name>-00000.json     its manifest: the fingerprint of what it holds, its rows [start, stop), byte size,
                          sha256 and file stamp, row shapes, and the caller's `inputs` (e.g. its images' hashes)
    ...
    <name>.json           the index: the store's fingerprint, the caller's fields, the shard list; written last

Every file is written atomically, a shard before its manifest and the index after every shard, so a killed build
leaves only complete shards behind. The next build reuses each shard whose manifest has the fingerprint asked for
and whose file is the one written (same stamp: size, mtime, ctime, inode) or still hashes to its sha256 (a file
copied in from another store is refused); it rebuilds a missing, truncated, foreign or malformed shard, with a log
line saying why, and removes files of earlier builds that are no shard of this one.

Without a directory the store keeps the payloads in memory: every shard is built, nothing is reused.

Under `torch.distributed` every rank calls `sync`: rank 0 decides what is reusable, the shards to build are split
over the ranks, and every rank gets every shard (its manifest, or in memory its payload). How rows are blocked is
the store's distribution strategy ([`ShardStore.blocks`]): a directory keeps fixed-size blocks (a changed input
rebuilds one shard, a killed build resumes shard by shard) and the ranks share them round-robin; in memory, where
nothing is kept, the rows are split into one block per rank, built at once.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, Protocol

from ..distributed import all_gather_object, broadcast_object, world
from .atomic import atomic_write_bytes, atomic_write_json
from .hashing import file_sha256, sha256
from .stamps import file_stat

logger = logging.getLogger(__name__)


class Codec(Protocol):
    """How a shard's payload is stored: `extension` names its files, `encode` turns a payload into bytes,
    `read(path)` back; `rows` counts a payload's rows; `describe` gives the manifest's fields of a payload (row
    shapes); `check(path, manifest, rows)` says cheaply why a stored file cannot hold those rows, or None."""

    extension: str

    def encode(self, payload) -> bytes: ...

    def read(self, path: Path): ...

    def rows(self, payload) -> int: ...

    def describe(self, payload) -> dict: ...

    def check(self, path: Path, manifest: dict, rows: int) -> str | None: ...


class RecordsCodec:
    """A payload of JSON objects, one per row, stored as JSON lines."""

    extension = "jsonl"

    def encode(self, payload: list[dict]) -> bytes:
        return "".join(json.dumps(record) + "\n" for record in payload).encode()

    def read(self, path: Path) -> list[dict]:
        records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        if not all(isinstance(r, dict) for r in records):
            raise ValueError(f"{path} holds JSON lines that are not objects")
        return records

    def rows(self, payload: list[dict]) -> int:
        return len(payload)

    def describe(self, payload: list[dict]) -> dict:
        return {}

    def check(self, path: Path, manifest: dict, rows: int) -> str | None:
        return None  # no cheap structural check: the size and the sha256 of the stamp rule do the work


@dataclass
class ShardPlan:
    """A shard the store must hold: rows `[start, stop)`, the `fingerprint` of what they are made of (a stored shard
    is reused only under an equal one) and `inputs`, the caller's cache written into the manifest."""

    start: int
    stop: int
    fingerprint: dict
    inputs: dict = field(default_factory=dict)


@dataclass
class Shard:
    """A shard the store holds: `manifest` (see the module docstring), and `path` (in a directory) or `payload`."""

    index: int
    manifest: dict
    path: Path | None = None
    payload: Any = None


@dataclass
class ShardJob:
    """What `build` gets for shard `index`: its plan, a `label` for progress bars ("shard 2/5 (rank 1 of 2)") and
    `previous()`, the payload of the stored shard it replaces (None if there is none or it cannot be read), from
    which a builder may take rows that are still valid."""

    index: int
    plan: ShardPlan
    label: str
    previous: Callable[[], Any]


def fixed_size_blocks(n: int, size: int) -> list[tuple[int, int]]:
    """`[0, size), [size, 2 size), ...` over `n` rows: the blocks of a stored store."""
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def one_block_per_rank(n: int, world_size: int) -> list[tuple[int, int]]:
    """`n` rows in `world_size` contiguous blocks of sizes differing by at most one (empty blocks dropped): the
    blocks of an in-memory store, so that each rank builds one block and none waits."""
    bounds = [n * r // world_size for r in range(world_size + 1)]
    return [(a, b) for a, b in pairwise(bounds) if b > a]


class ShardStore:
    """
    Shards of rows in `directory` (see the module docstring), or in memory when `directory` is None.

    Args:
        directory: where the shards live, or None (in memory).
        name: the files' stem (`bank` -> `bank-00000.safetensors`, `bank-00000.json`, the index `bank.json`).
        codec: how payloads are stored ([`RecordsCodec`], `tensor_shards.SafetensorsCodec`).
        what: the store in log lines ("candidate bank").
        also_remove: file names of older layouts that a build removes.
    """

    def __init__(self, directory: str | Path | None, name: str, codec: Codec, what: str,
                 also_remove: Sequence[str] = ()):
        self.directory = Path(directory) if directory is not None else None
        self.name, self.codec, self.what = name, codec, what
        stem, extension = re.escape(name), re.escape(codec.extension)
        self._ours = re.compile("|".join([rf"{stem}-\d+\.(?:{extension}|json)", rf"\.{stem}[-.].*",
                                          *map(re.escape, also_remove)]))

    def __repr__(self) -> str:
        return f"ShardStore({self.what!r}, {self.directory or 'in memory'})"

    # ------------------------------------------------------------------------------------------- layout
    def blocks(self, n: int, shard_size: int) -> list[tuple[int, int]]:
        """The row blocks of `n` rows: fixed `shard_size` blocks in a directory, one block per rank in memory."""
        if self.directory is None:
            return one_block_per_rank(n, world()[1])
        return fixed_size_blocks(n, shard_size)

    def shard_path(self, k: int) -> Path:
        return self.directory / f"{self.name}-{k:05d}.{self.codec.extension}"

    def manifest_path(self, k: int) -> Path:
        return self.directory / f"{self.name}-{k:05d}.json"

    @property
    def index_path(self) -> Path:
        return self.directory / f"{self.name}.json"

    def manifests(self, count: int) -> list[dict | None]:
        """The stored manifest of each of `count` shards (None where missing or not a JSON object), read on rank 0
        and given to every rank: the caller's `inputs` cache lives in them. Pass them on to `sync`."""
        if self.directory is None:
            return [None] * count
        rank = world()[0]
        return broadcast_object([self.manifest(k) for k in range(count)] if rank == 0 else None)

    def manifest(self, k: int) -> dict | None:
        """The stored manifest of shard `k` (None where missing or not a JSON object), read by this process alone."""
        return _read_json(self.manifest_path(k))

    def verify(self, k: int, plan: ShardPlan, manifest: dict | None) -> str | None:
        """Why the stored shard `k` does not hold what `plan` asks for, or None; reads only (a loader's integrity
        check). It does not when its `manifest` is missing, has another fingerprint, or describes another file
        (size, rows, the codec's structure, and the sha256 where the file's stamp is not the one written)."""
        if manifest is None:
            return f"its manifest {self.manifest_path(k).name} is missing or is not a JSON object"
        if manifest.get("fingerprint") != plan.fingerprint:
            return "its manifest says it holds other rows or was built from other inputs or settings"
        return self._check_file(self.shard_path(k), manifest, plan)[0]

    def foreign_files(self) -> list[str]:
        """The names of the entries of the store's directory that are not the store's own files (a user's files)."""
        if self.directory is None or not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir()
                      if not (p.is_file() and (p.name == self.index_path.name or self._ours.fullmatch(p.name))))

    def remove(self) -> None:
        """Delete the store's own files, and its directory once empty (never another file)."""
        if self.directory is None or not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            if path.is_file() and (path.name == self.index_path.name or self._ours.fullmatch(path.name)):
                path.unlink(missing_ok=True)
        if not any(self.directory.iterdir()):
            self.directory.rmdir()

    def read(self, shard: Shard):
        """A shard's payload: in memory, or read from its file."""
        return shard.payload if shard.path is None else self.codec.read(shard.path)

    # ------------------------------------------------------------------------------------------- sync
    def sync(self, plans: Sequence[ShardPlan | None], build: Callable[[ShardJob], Any] | None,
             manifests: Sequence[dict | None], fingerprint: dict, index_fields: dict | None = None
             ) -> list[Shard | None]:
        """Hold a shard for every plan: reuse the stored ones that match, build the others with `build(job)` (a
        payload of `plan.stop - plan.start` rows), split over the ranks. A None plan is left alone (another process
        of a split run holds it), and so is every shard to build when `build` is None (a check that a split run is
        complete). `manifests` are `manifests(len(plans))`; `fingerprint` and `index_fields` go into the index,
        written once every plan is held. Returns the shards, None where a plan was None or a shard is not built."""
        rank, world_size = world()
        stored = self._stored_index(fingerprint) if rank == 0 and self.directory is not None else None
        shards, rewritten = broadcast_object(self._decide(plans, manifests) if rank == 0 else None)
        todo = [k for k, plan in enumerate(plans) if plan is not None and shards[k] is None]
        if rank == 0 and self.directory is not None:
            self._start(todo if build is not None else [], len(plans), shards, rewritten)
        if build is not None:
            mine = todo[rank::world_size]
            built = {k: self._build(k, plans[k], build, f"{n + 1}/{len(mine)}") for n, k in enumerate(mine)}
            for part in all_gather_object(built):
                for k, shard in part.items():
                    shards[k] = shard
        if rank == 0 and self.directory is not None and None not in plans and None not in shards:
            index = {"fingerprint": fingerprint, **(index_fields or {}),
                     "shards": [{k: v for k, v in s.manifest.items() if k not in ("fingerprint", "inputs")}
                                for s in shards]}
            self._finish(shards, index, stored, changed=bool(todo) or bool(rewritten))
        return shards

    def _stored_index(self, fingerprint: dict) -> dict | None:
        """(rank 0) The stored index; logs what changed since it was written."""
        stored = _read_json(self.index_path)
        if stored is None and self.index_path.exists():
            logger.warning("Rebuilding the %s in %s: %s cannot be read (not a JSON object).", self.what,
                           self.directory, self.index_path)
        elif stored is not None:
            stored_fp = stored.get("fingerprint") if isinstance(stored.get("fingerprint"), dict) else {}
            changed = [k for k in fingerprint if stored_fp.get(k) != fingerprint[k]]
            if changed:
                logger.warning("Rebuilding the %s in %s: %s changed since it was built.", self.what, self.directory,
                               ", ".join(changed))
        return stored

    def _decide(self, plans, manifests) -> tuple[list[Shard | None], list[int]]:
        """(rank 0) The stored shards that can be reused as they are (None for the others), and those whose
        manifest is to be rewritten (a verified file's new stamp, new `inputs`)."""
        shards: list[Shard | None] = []
        rewritten = []
        for k, (plan, manifest) in enumerate(zip(plans, manifests)):
            shard = None
            if plan is not None and manifest is not None:
                shard = self._reusable(k, plan, manifest)
            elif plan is not None and self.directory is not None and self.shard_path(k).exists():
                logger.info("%s shard %s has no manifest; building it again.", self.what.capitalize(),
                            self.shard_path(k))
            if shard is not None and shard.manifest != manifest:
                rewritten.append(k)
            shards.append(shard)
        return shards, rewritten

    def _reusable(self, k: int, plan: ShardPlan, manifest: dict) -> Shard | None:
        """The stored shard `k` if it holds what `plan` asks for, else None with a log line saying why."""
        path = self.shard_path(k)
        if manifest.get("fingerprint") != plan.fingerprint:
            logger.info("%s shard %s was built from other inputs or settings; building it again.",
                        self.what.capitalize(), path)
            return None
        why, stat = self._check_file(path, manifest, plan)
        if why is not None:
            logger.warning("Rebuilding %s shard %s: %s.", self.what, path, why)
            return None
        return Shard(k, {**manifest, "stat": stat, "inputs": plan.inputs}, path)

    def _check_file(self, path: Path, manifest: dict, plan: ShardPlan) -> tuple[str | None, list[int] | None]:
        """(why the stored `path` does not hold the rows `manifest` says, or None; its stamp). Cheap checks (size,
        rows, the codec's structure) always; its sha256 when its stamp is not the one written with it (copied over,
        replaced, restored from a backup): a file of another store is never used unverified."""
        try:
            if not path.exists():
                return "it is missing", None
            size = path.stat().st_size
            if size != manifest.get("bytes"):
                return f"it has {size} bytes, its manifest says {manifest.get('bytes')} (truncated or overwritten)", None
            if (int(manifest["start"]), int(manifest["stop"])) != (plan.start, plan.stop):
                return (f"its manifest says rows [{manifest['start']}, {manifest['stop']}), not "
                        f"[{plan.start}, {plan.stop})"), None
            why = self.codec.check(path, manifest, plan.stop - plan.start)
            if why is not None:
                return why, None
            stat = file_stat(path)
            if manifest.get("stat") != stat and file_sha256(path) != manifest.get("sha256"):
                return f"its bytes do not match the sha256 written with it (another {self.what}'s file, or corrupt)", None
            return None, stat
        except (OSError, ValueError, KeyError, TypeError) as error:  # a malformed manifest
            return f"it cannot be read or its manifest is malformed ({type(error).__name__}: {error})", None

    def _start(self, todo: list[int], count: int, shards, rewritten: list[int]) -> None:
        """(rank 0) Before building: rewrite the manifests of reused shards that changed, say what is resumed, and
        remove the index, which comes back last: a crash in between leaves no index, only complete shards."""
        for k in rewritten:
            atomic_write_json(self.manifest_path(k), shards[k].manifest)
        if todo:
            if len(todo) < count:
                world_size = world()[1]
                logger.info("Resuming the %s build in %s: %d of %d shards are usable, building the other %d%s.",
                            self.what, self.directory, count - len(todo), count, len(todo),
                            f" over {world_size} processes" if world_size > 1 else "")
            self.index_path.unlink(missing_ok=True)

    def _build(self, k: int, plan: ShardPlan, build, number: str) -> Shard:
        """Build shard `k` and hold it ([`write`])."""
        rank, world_size = world()
        where = f" (rank {rank} of {world_size})" if world_size > 1 else ""
        label = "" if self.directory is None else f"shard {number}{where}"
        return self.write(k, plan, build(ShardJob(k, plan, label, lambda: self._previous(k))))

    def write(self, k: int, plan: ShardPlan, payload) -> Shard:
        """Hold `payload` (the `plan.stop - plan.start` rows of `plan`) as shard `k`: in a directory, its file and
        then its manifest, each written atomically (this process alone: no collective); in memory, as it is."""
        rows = self.codec.rows(payload)
        if rows != plan.stop - plan.start:
            raise RuntimeError(f"{self.what} shard {k} was built with {rows} rows for its rows [{plan.start}, "
                               f"{plan.stop}); its builder must return one row per input.")
        manifest = {"start": plan.start, "stop": plan.stop, **self.codec.describe(payload),
                    "fingerprint": plan.fingerprint}
        if self.directory is None:
            return Shard(k, manifest, payload=payload)
        data = self.codec.encode(payload)
        del payload
        path = self.shard_path(k)
        manifest = {"file": path.name, "bytes": len(data), "sha256": sha256(data), **manifest}
        self.manifest_path(k).unlink(missing_ok=True)
        atomic_write_bytes(path, data)
        del data
        manifest |= {"stat": file_stat(path), "inputs": plan.inputs}
        atomic_write_json(self.manifest_path(k), manifest)
        return Shard(k, manifest, path)

    def _previous(self, k: int):
        if self.directory is None or not self.shard_path(k).exists():
            return None
        try:
            return self.codec.read(self.shard_path(k))
        except (OSError, ValueError) as error:  # unreadable: none of its rows is reused
            logger.info("%s shard %s cannot be read (%s); none of its rows is reused.", self.what.capitalize(),
                        self.shard_path(k), error)
            return None

    def _finish(self, shards: list[Shard], index: dict, stored: dict | None, changed: bool) -> None:
        """(rank 0) Every plan is held: remove files of earlier builds and write the index, unless it is current."""
        if not changed and stored == index:
            rows = sum(s.manifest["stop"] - s.manifest["start"] for s in shards)
            logger.info("Loaded the %s of %d rows (%d shards) from %s", self.what, rows, len(shards), self.directory)
            return
        keep = {self.index_path.name} | {p(k).name for k in range(len(shards))
                                         for p in (self.shard_path, self.manifest_path)}
        for path in self.directory.iterdir():
            if path.is_file() and path.name not in keep and self._ours.fullmatch(path.name):
                path.unlink(missing_ok=True)
        atomic_write_json(self.index_path, index)


def _read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None if it is missing, unreadable, not JSON or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
