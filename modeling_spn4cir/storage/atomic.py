"""Atomic writes: a file or directory appears complete or not at all (a crash leaves the old one or none).

Output files named by the user (`write_output_file`: a CLI's `--json` / `--html`, a report) follow one rule: never a
directory or a link, never an input of the run, never inside a directory another writer replaces as a whole (its
marker), and an existing file only when it is a previous output of the same kind (its signature), never any other
file. Output directories are guarded (`atomic_directory`): a writer replaces only an empty directory or a previous
output of the same tool (recognized by its marker file `.spn4cir_output.json`, and only when asked to
overwrite), never a directory that is or contains its input data, and never while another process writes the
same directory (a lock file beside it names the owner's pid; a lock left by a dead process is taken over).
Staging directories left by a killed run are removed by the next run. Final files get the usual permissions
(0666/0777 minus the umask), not the 0600/0700 of `tempfile`; `apply_umask` gives them to the files a library wrote
through a private temporary file (safetensors' `save_file`, behind `save_pretrained`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:  # POSIX: the lock dies with its process, so a SIGKILLed writer never blocks the next run
    import fcntl
except ImportError:  # pragma: no cover - Windows: a pid file, taken over when its pid is gone
    fcntl = None

logger = logging.getLogger(__name__)

MARKER = ".spn4cir_output.json"
OVERWRITE_HINT = "--overwrite_output_dir (overwrite=True)"


class OutputDirError(ValueError):
    """An output directory this writer must not replace (someone else's files, the input data, ...)."""


class OutputLockedError(RuntimeError):
    """Another live process is writing the same output."""


def _create(parent: Path, prefix: str, suffix: str, make) -> Path:
    """`make(parent / f"{prefix}{random}{suffix}")` for a fresh random name (retried on a clash)."""
    for _ in range(100):
        candidate = parent / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            make(candidate)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name {prefix}*{suffix} in {parent}")


# ------------------------------------------------------------------------------------------------ files
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    fds = []
    # mode 0o666 goes through the umask, as open() does (mkstemp would leave 0600)
    tmp = _create(path.parent, f".{path.name}.", ".tmp", lambda p: fds.append(os.open(p, flags, 0o666)))
    try:
        with os.fdopen(fds[0], "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, payload, **dump_kwargs) -> Path:
    return atomic_write_bytes(path, json.dumps(payload, **dump_kwargs).encode())


def writable_dir(path: str | os.PathLike) -> bool:
    """Whether this process can create `path` (a directory, with its parents) and write files in it: tried, not
    guessed from permission bits (a read-only mount, a root-owned folder, a file in the way all say no)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        probe = _create(path, ".write-probe-", ".tmp", lambda p: os.close(os.open(p, flags)))
        os.remove(probe)
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------ output files
SIGNATURE_BYTES = 65536  # where a file's signature must appear (a JSON's first key, an HTML head, a PNG text chunk)


class OutputFileError(ValueError):
    """An output file this writer must not write (an input, a file inside another output, someone else's file)."""


def _is_inside(path: Path, others: Iterable[str | os.PathLike | None]) -> str | None:
    """The first of `others` that `path` is, or lies inside (compared as given and with links resolved)."""
    forms = {path.absolute(), path.resolve()}
    for other in others:
        if other is None:
            continue
        for candidate in {Path(other).absolute(), Path(other).resolve()}:
            if any(form == candidate or candidate in form.parents for form in forms):
                return str(other)
    return None


def _holds(path: Path, signatures: tuple[bytes, ...]) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(SIGNATURE_BYTES)
    except OSError:
        return False
    return any(signature in head for signature in signatures)


def check_output_file(path: str | os.PathLike, signature: bytes | tuple[bytes, ...], what: str,
                      protect: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Raise `OutputFileError`, naming `path` and the fix, unless `write_output_file(path, ..., signature)` may
    write it: `path` is not a directory or a link, not one of `protect` (the run's inputs) nor inside one of those
    that are folders, not inside a directory written as a whole by `atomic_directory` (a gallery index, a dataset),
    and either new or a previous output of this kind (its first bytes hold `signature`, or one of a tuple of them:
    the current one first, then those of earlier versions). Returns `path`."""
    signatures = signature if isinstance(signature, tuple) else (signature,)
    path = Path(path)
    if path.is_symlink():
        raise OutputFileError(f"The output path {path} for the {what} is a symbolic link (to {os.readlink(path)}); "
                              "pass a real file path.")
    if path.is_dir():
        raise OutputFileError(f"The output path {path} for the {what} is a directory; pass a file path.")
    source = _is_inside(path, protect)
    if source is not None:
        raise OutputFileError(f"The output path {path} for the {what} is, or lies inside, an input of this run "
                              f"({source}); writing there would destroy it. Choose another path.")
    marker = read_marker(path.parent)
    if marker is not None:
        raise OutputFileError(
            f"The output path {path} for the {what} lies inside {path.parent}, an output of {marker['tool']} that is "
            f"written as a whole: the file would change that output, and be lost when it is next written. Choose a "
            f"path outside it (e.g. {path.parent.parent / path.name}).")
    if path.exists() and not _holds(path, signatures):
        raise OutputFileError(
            f"{path} exists and is not a {what} written by spn4cir; refusing to replace it (it may be an image, an "
            "index file, or anyone's data). Choose a new path, or move or delete that file yourself.")
    return path


def write_output_file(path: str | os.PathLike, data: bytes, signature: bytes | tuple[bytes, ...], what: str,
                      protect: Iterable[str | os.PathLike | None] = ()) -> Path:
    """`atomic_write_bytes(path, data)` under the rule of `check_output_file`; `data` carries `signature` (the
    first of a tuple) in its first bytes, so that the next run recognizes the file as its own."""
    current = signature[0] if isinstance(signature, tuple) else signature
    if current not in data[:SIGNATURE_BYTES]:
        raise ValueError(f"the {what} written to {path} does not carry its signature {current!r} in its first "
                         f"{SIGNATURE_BYTES} bytes")
    return atomic_write_bytes(check_output_file(path, signature, what, protect), data)


def current_umask() -> int:
    """The process's umask, read from /proc where it can be (setting it to read it back races with other threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(directory: str | os.PathLike) -> None:
    """Give the files of `directory` that a library wrote through a private temporary file the permissions of every
    other output (0666 minus the umask): safetensors' `save_file` (behind `save_pretrained`: `model.safetensors`,
    a LoRA adapter's weights) leaves them 0600, beside 0644 siblings. Only files of mode 0600 are changed."""
    mode = 0o666 & ~current_umask()
    for path in Path(directory).iterdir():
        if mode != 0o600 and path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600:
            os.chmod(path, mode)


# ------------------------------------------------------------------------------------------------ locking
def lock_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.parent / f".{path.name}.lock"


def _lock_owner(lock: Path) -> str:
    try:
        owner = json.loads(lock.read_text())
        return f"pid {owner['pid']} on {owner['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown process"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:  # pragma: no cover - e.g. Windows' invalid-parameter for a gone pid
        return False
    return True


@contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock file `.<name>.lock` beside `path` (with this process's pid) for the duration; raise
    `OutputLockedError`, naming the owner, while another live process holds it."""
    path = Path(path)
    lock = lock_path(path)
    owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
    def refuse():
        return OutputLockedError(
            f"{path} is being written by another process ({_lock_owner(lock)}, lock file {lock}); wait for it to "
            f"finish, or write to another directory. If that process is no longer running, delete {lock}."
        )

    if fcntl is not None:
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise refuse() from None
            try:  # the file may have been unlinked by its previous owner between our open and flock
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, owner)
            yield lock
        finally:
            try:
                os.unlink(lock)
            finally:
                os.close(fd)
        return
    # without flock: an exclusive pid file, taken over when its process is gone
    while True:
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            try:
                pid = int(json.loads(lock.read_text())["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                pid = None
            if pid is not None and _pid_alive(pid):
                raise refuse() from None
            try:
                os.unlink(lock)
            except FileNotFoundError:
                pass
    try:
        os.write(fd, owner)
        os.close(fd)
        yield lock
    finally:
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass


def wait_for_unlock(path: str | os.PathLike, timeout: float = 24 * 3600.0, poll: float = 2.0) -> None:
    """Block until no live process holds the lock of `path` (for readers of a cache another process builds)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            with output_lock(path):
                return
        except OutputLockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(poll)


# ------------------------------------------------------------------------------------------------ directories
def _leftovers(path: Path) -> list[Path]:
    """Staging / replaced directories of `path` left by a killed run: `.<name>.staging-<hex>`,
    `.<name>.old-<hex>`, and the `.<name>.<8 chars>` of older versions (mkdtemp)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(?:staging|old)-[0-9a-f]{{12}}|[a-z0-9_]{{8}})")
    if not path.parent.is_dir():
        return []
    return [p for p in path.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]


def read_marker(path: str | os.PathLike) -> dict | None:
    """The marker of a directory written by `atomic_directory` (`{"tool": ...}`), or None."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("tool"), str) else None


def check_output_dir(path: str | os.PathLike, tool: str, overwrite: bool = False,
                     protect: Iterable[str | os.PathLike | None] = ()) -> None:
    """Raise `OutputDirError` unless `atomic_directory(path, tool, overwrite, protect)` may replace `path`."""
    path = Path(path)
    out = path.absolute()
    resolved = path.resolve()
    for source in protect:
        if source is None:
            continue
        for candidate in {Path(source).absolute(), Path(source).resolve()}:
            if candidate == out or candidate == resolved or out in candidate.parents or resolved in candidate.parents:
                raise OutputDirError(
                    f"The output directory {path} is or contains the input {source}: writing it would delete the "
                    "input. Choose an output directory outside the input data."
                )
    if path.is_symlink():
        raise OutputDirError(f"The output directory {path} is a symbolic link (to {resolved}); pass a real "
                             "directory (e.g. the link's target) as the output directory.")
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputDirError(f"The output path {path} exists and is not a directory; choose another output path.")
    if not any(path.iterdir()):
        return
    marker = read_marker(path)
    if marker is None:
        raise OutputDirError(
            f"The output directory {path} is not empty and is not an output of {tool} (it has no {MARKER}); "
            "refusing to replace it, which would delete its files. Choose a new or empty output directory, or "
            "move its contents away yourself."
        )
    if marker["tool"] != tool:
        raise OutputDirError(
            f"The output directory {path} holds an output of {marker['tool']}, not of {tool}; refusing to replace "
            "it. Choose another output directory, or delete it yourself."
        )
    if not overwrite:
        raise OutputDirError(
            f"The output directory {path} already holds an output of {tool}; pass {OVERWRITE_HINT} to replace "
            "it, or choose another output directory."
        )


@contextmanager
def atomic_directory(path: str | os.PathLike, *, tool: str, overwrite: bool = False,
                     protect: Iterable[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """Yield a staging directory beside `path`; on success it replaces `path` (with the marker of `tool`), on
    error it is removed.

    `path` may be absent, an empty directory, or (with `overwrite`) a previous output of the same `tool`; it
    must not be, or contain, any of `protect` (the inputs). While writing, the lock of `path` is held.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    protect = list(protect)
    check_output_dir(path, tool, overwrite, protect)  # before waiting on anything: a refusal is immediate
    with output_lock(path):
        for leftover in _leftovers(path):
            logger.warning("removing %s, left by an interrupted run writing %s", leftover, path)
            shutil.rmtree(leftover, ignore_errors=True)
        check_output_dir(path, tool, overwrite, protect)  # again under the lock: another writer may have finished
        # os.mkdir's mode goes through the umask (mkdtemp would leave 0700)
        staging = _create(path.parent, f".{path.name}.staging-", "", lambda p: os.mkdir(p, 0o777))
        try:
            yield staging
            (staging / MARKER).write_text(json.dumps({"tool": tool, "format": 1}) + "\n")
            old = None
            if path.exists():
                old = _create(path.parent, f".{path.name}.old-", "", lambda p: os.mkdir(p, 0o700))
                os.replace(path, old)  # an empty directory is replaced by a rename
            os.replace(staging, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
