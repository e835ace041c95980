"""Tensors stored as row blocks in safetensors shards: the codec of a [`ShardStore`] of tensors, and a memory-mapped
view that reads the rows a batch asks for ([`ShardedRows`]; the candidate bank's reference features)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .stamps import file_stat

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class SafetensorsCodec:
    """A payload `{key: tensor [rows, ...]}` with the keys `keys`, every tensor of `dtype`, stored as one
    safetensors file; the manifest records each key's row shape (`<key>_row_shape`)."""

    extension = "safetensors"

    def __init__(self, keys: Sequence[str], dtype: torch.dtype):
        self.keys, self.dtype = tuple(keys), dtype

    def encode(self, payload: dict[str, torch.Tensor]) -> bytes:
        return save({key: payload[key].contiguous() for key in self.keys})

    def read(self, path: Path, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in (keys or self.keys)}

    def rows(self, payload: dict[str, torch.Tensor]) -> int:
        counts = {int(payload[key].shape[0]) for key in self.keys}
        if len(counts) != 1:
            raise ValueError(f"the tensors {list(self.keys)} of a shard must have the same number of rows, got "
                             f"{[tuple(payload[key].shape) for key in self.keys]}")
        return counts.pop()

    def describe(self, payload: dict[str, torch.Tensor]) -> dict:
        return {f"{key}_row_shape": list(payload[key].shape[1:]) for key in self.keys}

    def check(self, path: Path, manifest: dict, rows: int) -> str | None:
        try:
            with safe_open(str(path), framework="pt") as f:
                if set(f.keys()) != set(self.keys):
                    return f"it holds {sorted(f.keys())}, not {list(self.keys)}"
                for key in self.keys:
                    sl = f.get_slice(key)
                    shape = sl.get_shape()
                    if shape[:1] != [rows]:
                        return f"its {key} have shape {shape}, not {rows} rows"
                    if list(shape[1:]) != list(manifest.get(f"{key}_row_shape", shape[1:])):
                        return f"its {key} rows have shape {shape[1:]}, not {manifest[f'{key}_row_shape']}"
                    if _SAFETENSORS_DTYPES.get(sl.get_dtype()) != self.dtype:
                        return f"its {key} are {sl.get_dtype()}, not {str(self.dtype).removeprefix('torch.')}"
        except SafetensorError as error:
            return f"it cannot be read ({type(error).__name__}: {error})"
        return None


def _stamp_or_none(path: str) -> list[int] | None:
    try:
        return file_stat(path)
    except OSError:
        return None


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
        # opened now: the maps keep reading these files even if a later build replaces them in the directory; their
        # stamps tell a reopening (a spawned DataLoader worker) whether they are still the files mapped here
        self._stamps = [file_stat(f) for f in self.files]
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
            if _stamp_or_none(self.files[k]) != self._stamps[k]:
                raise RuntimeError(
                    f"shard {self.files[k]} of {self.name!r} is no longer the file this view was made from (another "
                    "run rebuilt it in the same directory, e.g. a shared --bank_dir): reading it would mix two banks. "
                    "Restart this run (its bank is loaded again), or give each run its own bank directory.")
            try:
                handle = safe_open(self.files[k], framework="pt")
            except Exception as error:
                raise RuntimeError(f"cannot read shard {self.files[k]} of {self.name!r}: {error}. Delete it: the next "
                                   "build of its store builds its rows again.") from error
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
        bad = rows[(rows < -n) | (rows >= n)]
        if bad.numel():
            raise IndexError(f"row {int(bad[0])} is out of range for {self.name!r}, which has {n} rows (valid: -{n} to "
                             f"{n - 1}); {bad.numel()} of the {rows.numel()} rows asked for are out of range.")
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
