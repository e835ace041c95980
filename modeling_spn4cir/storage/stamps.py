"""The one staleness rule: a file is unchanged while its stamp is (size, mtime, ctime and inode, read from metadata
only). ctime and inode cannot be set back, unlike mtime, so a rewrite, a copy over it or a replacement always
changes the stamp; a value cached under a stamp (a content hash, a shard's verification) is valid while it holds."""

from __future__ import annotations

import os


def file_stat(path: str | os.PathLike) -> list[int]:
    """`[size, mtime_ns, ctime_ns, inode]` of a file (no byte is read)."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def file_stamp(path: str | os.PathLike, name: str | None = None) -> str:
    """`"<name>:<size>:<mtime_ns>:<ctime_ns>:<inode>"` (`name` defaults to the path): a file's stamp as a string,
    for keys that combine the stamps of several files."""
    return ":".join(map(str, [path if name is None else name, *file_stat(path)]))
