"""Run a benchmark callable in a fresh (spawned) process and report its wall time and peak resident memory
above what the process held when the callable started.

The baseline and the candidate of a benchmark both run through this in the same script run, so their
numbers are comparable: ratios, not absolute times, are what docs/benchmarks.md records. A spawned child (not a
forked one) avoids inheriting the parent's OpenMP thread pool, which deadlocks torch after fork.
"""

import multiprocessing as mp
import threading
import time

import psutil


def peak_rss_mib(fn):
    """-> (peak extra MiB, seconds, fn's return value) of `fn()`: resident memory sampled every 2 ms above what the
    process held when `fn` started."""
    process = psutil.Process()
    start = process.memory_info().rss
    peak = [start]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        result = fn()
    finally:
        elapsed = time.perf_counter() - t0
        done.set()
        sampler.join()
    peak[0] = max(peak[0], process.memory_info().rss)
    return (peak[0] - start) / 2**20, elapsed, result


def _child(setup, setup_args, fn, queue):
    import torch

    torch.set_num_threads(2)
    data = setup(*setup_args)
    peak, elapsed, result = peak_rss_mib(lambda: fn(*data))
    queue.put((elapsed, peak, result))


def spawn(target, *args):
    """`target(*args, queue)` in a fresh spawned process; -> the one item it puts on `queue`."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    out = queue.get()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"benchmark child exited with {proc.exitcode}")
    return out


def measure(setup, setup_args, fn):
    """-> (seconds, peak extra MiB, fn's return value) of `fn(*setup(*setup_args))`; module-level functions only."""
    return spawn(_child, setup, setup_args, fn)
