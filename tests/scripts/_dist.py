"""Process-group start-up shared by the torchrun test scripts.

A watchdog first: if the script hangs, every thread's stack is printed and the process exits, so a CI log shows
where it hung instead of a bare timeout (`conftest.run_two_processes` reads that header). Then gloo, which
`run_two_processes` points at the loopback interface and a 127.0.0.1 rendezvous: no hostname lookup."""

import faulthandler
import os

import torch.distributed as dist


def init_gloo() -> None:
    faulthandler.dump_traceback_later(float(os.environ.get("SPN4CIR_TEST_WATCHDOG_S", "150")), exit=True)
    dist.init_process_group("gloo")


def save_from_rank0(obj, path) -> None:
    """Rank 0 writes `obj` to `path` (torch.save); then every rank waits for the others and leaves the group."""
    import torch

    if dist.get_rank() == 0:
        torch.save(obj, path)
    dist.barrier()
    dist.destroy_process_group()
