"""Run a list of steps in one process, or split over lanes: processes with one thread each, side by side.

On this project's 2-core machine a second thread per process speeds the recipe's tiny models up little, a second
process much more (docs/reproduction.md). Each lane runs its steps in its own order (the recipe's: the
captioner trains while the first lane runs stage 0) and waits when it needs a value another lane has not made
yet. Steps hand their values to other lanes as JSON files, so a value must be JSON-able.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from modeling_spn4cir.storage import atomic_write_json

ORDINALS = ("first", "second", "third", "fourth")
POLL_S = 0.5  # how often a waiting lane looks for the other lane's value (and checks that it is alive)


def lane_name(lane: int) -> str:
    """"first lane", "second lane", ...: the keys of `StepsRun.seconds`."""
    return f"{ORDINALS[lane]} lane" if lane < len(ORDINALS) else f"lane {lane + 1}"


@dataclass(frozen=True)
class Step:
    """One step: `run(*values of needs)` returns its value (JSON types, or None); `after`: steps whose outputs on
    disk it reads (their values are not passed)."""

    name: str
    run: Callable[..., Any]
    needs: tuple[str, ...] = ()
    after: tuple[str, ...] = ()

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.needs + self.after


@dataclass
class StepsRun:
    values: dict[str, Any]  # every step's value, by name
    seconds: dict[str, dict[str, float]]  # per lane ("first lane", ...): seconds per step and per wait


@contextlib.contextmanager
def one_thread_per_lane(in_lanes: bool) -> Iterator[None]:
    """With lanes, this process (the first lane) runs one thread like the others; the caller's setting (e.g. a
    test session's) is restored afterwards."""
    threads = torch.get_num_threads()
    try:
        if in_lanes:
            torch.set_num_threads(1)
        yield
    finally:
        torch.set_num_threads(threads)


def run_steps(steps: list[Step], lanes: Sequence[Sequence[str]], in_processes: bool = False,
              exchange_dir: Path | None = None, lane_steps: Callable[[], list[Step]] | None = None) -> StepsRun:
    """Run `steps` (each after the steps it reads) and return their values and seconds (per lane).

    `lanes[i]` names the steps lane i runs, in its order. `in_processes=False`: every step here, in list order.
    `True`: lane 0 here, each other lane in a process of its own (spawned: one thread, no progress bars) that
    builds the same list with `lane_steps()` (picklable); a lane waits for another lane's value when it needs it,
    through `exchange_dir` (emptied first)."""
    _check_order(steps)
    _check_lanes(steps, lanes)
    if not in_processes:
        values: dict[str, Any] = {}
        done = _run_lane(steps, [s.name for s in steps], values, _Exchange(steps))
        return StepsRun(values, {lane_name(i): {n: done[n] for n in lane} for i, lane in enumerate(lanes)})
    exchange = _Exchange(steps, exchange_dir)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_lane_process, args=(lane_steps, lanes, i, exchange_dir),
                         name=lane_name(i).replace(" ", "-")) for i in range(1, len(lanes))]
    for proc in procs:
        proc.start()
    exchange.others = procs
    try:
        values = {}
        seconds = {lane_name(0): _run_lane(steps, lanes[0], values, exchange)}
        for name in (n for lane in lanes[1:] for n in lane):
            values[name] = exchange.wait(name)
        for proc in procs:
            proc.join()
        failed = [proc.name for proc in procs if proc.exitcode != 0]
        if failed:
            raise RuntimeError(f"The lane(s) {failed} failed (tracebacks above); run again to resume.")
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join()
    return StepsRun({s.name: values[s.name] for s in steps},
                    seconds | {lane_name(i): exchange.read_seconds(i) for i in range(1, len(lanes))})


def _check_order(steps: list[Step]) -> None:
    seen: set[str] = set()
    for step in steps:
        unknown = [n for n in step.inputs if n not in seen]
        if unknown:
            raise ValueError(f"Step {step.name!r} reads {unknown}, which no earlier step of the list makes; list "
                             "each step after the steps it reads.")
        seen.add(step.name)


def _check_lanes(steps: list[Step], lanes: Sequence[Sequence[str]]) -> None:
    """Every step in one lane, and the lanes never all waiting: play the lanes' orders through."""
    names = [n for lane in lanes for n in lane]
    if sorted(names) != sorted(s.name for s in steps):
        raise ValueError(f"The lanes {lanes} must name every step once: {[s.name for s in steps]}.")
    by_name, done, heads = {s.name: s for s in steps}, set(), [0] * len(lanes)
    while len(done) < len(names):
        moved = False
        for i, lane in enumerate(lanes):
            while heads[i] < len(lane) and set(by_name[lane[heads[i]]].inputs) <= done:
                done.add(lane[heads[i]])
                heads[i], moved = heads[i] + 1, True
        if not moved:
            stuck = [lane[h] for lane, h in zip(lanes, heads) if h < len(lane)]
            raise ValueError(f"The lanes {lanes} would wait for each other for ever at {stuck}.")


def _lane_process(lane_steps: Callable[[], list[Step]], lanes, lane: int, exchange_dir: Path) -> None:
    torch.set_num_threads(1)
    datasets.disable_progress_bars()  # one lane's bars would interleave with the other's
    steps = lane_steps()
    exchange = _Exchange(steps, exchange_dir, clear=False)
    exchange.write_seconds(lane, _run_lane(steps, lanes[lane], {}, exchange))


def _run_lane(steps: list[Step], order: Sequence[str], values: dict[str, Any], exchange: "_Exchange") -> dict:
    """Run the steps named in `order` into `values`, each once the values it reads are there (another lane's are
    waited for). Returns the seconds per step and per wait."""
    by_name = {s.name: s for s in steps}
    seconds: dict[str, float] = {}
    for name in order:
        step = by_name[name]
        for missing in [n for n in step.inputs if n not in values]:
            start = time.perf_counter()
            values[missing] = exchange.wait(missing)
            seconds[f"waiting for {missing}"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        values[name] = step.run(*(values[n] for n in step.needs))
        exchange.publish(name, values[name])
        seconds[name] = round(time.perf_counter() - start, 1)
    return seconds


class _Exchange:
    """The lanes' values as files `<step index>.json` in a directory (no directory: one process, no exchange)."""

    def __init__(self, steps: list[Step], directory: Path | None = None, clear: bool = True):
        self.index = {s.name: i for i, s in enumerate(steps)}
        self.directory = directory
        self.others: list = []  # the lanes' processes, seen from the first lane
        if directory is not None and clear:
            shutil.rmtree(directory, ignore_errors=True)  # values of an earlier run must never be read
            directory.mkdir(parents=True)

    def _path(self, name: str) -> Path:
        return self.directory / f"{self.index[name]}.json"

    def publish(self, name: str, value) -> None:
        if self.directory is not None:
            atomic_write_json(self._path(name), {"step": name, "value": value})

    def wait(self, name: str):
        """The value of another lane's step `name`; fail (never hang) if that lane, or the first one, has died."""
        while not self._path(name).exists():
            dead = [p for p in self.others if not p.is_alive()]
            if dead:
                raise RuntimeError(f"The recipe's {dead[0].name} stopped (exit code {dead[0].exitcode}) before "
                                   f"{name!r} was done; its traceback is printed above.")
            parent = multiprocessing.parent_process()
            if parent is not None and not parent.is_alive():
                raise SystemExit("The recipe's main process has gone; this lane stops too.")
            time.sleep(POLL_S)
        return json.loads(self._path(name).read_text())["value"]

    def write_seconds(self, lane: int, seconds: dict) -> None:
        atomic_write_json(self.directory / f"seconds-{lane}.json", seconds)

    def read_seconds(self, lane: int) -> dict:
        return json.loads((self.directory / f"seconds-{lane}.json").read_text())
