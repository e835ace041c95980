"""The one sha256 helper: of bytes, of a stream of byte chunks, of a file, of a JSON value (hex digests)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable


def sha256(data: bytes | Iterable[bytes]) -> str:
    """sha256 (hex) of `data`, or of the concatenation of an iterable of byte chunks (hashed as they come, so a
    generator of tensors' bytes never holds them all at once)."""
    digest = hashlib.sha256()
    for chunk in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
        digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """sha256 (hex) of a file's bytes, read in chunks (bank shards and checkpoints can be gigabytes)."""
    with open(path, "rb") as f:
        return sha256(iter(lambda: f.read(chunk), b""))


def json_sha256(value) -> str:
    """sha256 (hex) of `value` as canonical JSON (sorted keys; other types by `str`)."""
    return sha256(json.dumps(value, sort_keys=True, default=str).encode())
