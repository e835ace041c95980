"""The lock of a directory a run writes: a training's output directory, a stage-2 bank, a de-duplication cache, a
gallery index being built, a model zoo.

It is the converters' lock (`atomic.output_lock`: the file `.<name>.lock` beside the directory, holding the owner's
pid; a lock left by a killed process is taken over), held for as long as the run writes or reads what it wrote:

- `wait=False` (a training's `--output_dir`): a second run fails at once, naming the directory and the holder;
- `wait=True` (a cache several runs may share, such as `--bank_dir`): a second run waits until the first is done
  with it, then finds the cache as the first left it (reused when it is what it needs, rebuilt otherwise), so it
  never reads another run's half-written or different files.

A run of several processes (`torch.distributed`) holds the lock once, on rank 0; every rank must enter
`directory_lock` together, and every rank gets rank 0's outcome (the same error on each; while waiting, one cheap
collective per poll, so no rank sits in a collective past its timeout). Re-entering the lock of a directory this
process already holds is free, so a library function that locks its directory can run inside a run that does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from ..distributed import broadcast_object, world
from .atomic import OutputLockedError, output_lock

logger = logging.getLogger(__name__)

_HELD: dict[Path, int] = {}  # directories whose lock this process holds -> nesting depth


def _key(path: str | Path) -> Path:
    return Path(path).absolute().resolve()


def _try_lock(stack: ExitStack, path: Path) -> str | None:
    """Take the lock of `path` into `stack`; None on success, else the refusal's message."""
    try:
        stack.enter_context(output_lock(path))
        return None
    except OutputLockedError as error:
        return str(error)


@contextmanager
def directory_lock(path: str | Path, what: str = "run", wait: bool = False, poll: float = 2.0,
                   timeout: float = 7 * 24 * 3600.0) -> Iterator[Path]:
    """Hold the lock of directory `path` (see the module docstring) for the duration; `what` names the writer in
    messages ("training output", "candidate bank"). Raises `OutputLockedError` naming the directory and the holder
    when another process holds it (`wait=False`, or after `timeout` seconds of waiting)."""
    key = _key(path)
    rank = world()[0]
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield key
        finally:
            _HELD[key] -= 1
        return
    with ExitStack() as stack:
        key.parent.mkdir(parents=True, exist_ok=True)
        deadline, told = time.monotonic() + timeout, False
        while True:
            # rank 0 decides (lock taken, or refused and whether to give up), every rank follows the same decision
            outcome = None
            if rank == 0:
                refusal = _try_lock(stack, key)
                outcome = None if refusal is None else (refusal, not wait or time.monotonic() > deadline)
            outcome = broadcast_object(outcome)
            if outcome is None:
                break
            refusal, give_up = outcome
            if give_up:
                raise OutputLockedError(f"Cannot use {key} for this {what}: {refusal}")
            if not told:
                logger.warning("Waiting for the other process using %s to finish (this %s needs it): %s", key,
                               what, refusal)
                told = True
            time.sleep(poll)
        _HELD[key] = 1
        try:
            yield key
        finally:
            del _HELD[key]


def holds_directory_lock(path: str | Path) -> bool:
    """Whether this process holds the lock of `path` (through `directory_lock`)."""
    return bool(_HELD.get(_key(path)))


__all__ = ["directory_lock", "holds_directory_lock"]
