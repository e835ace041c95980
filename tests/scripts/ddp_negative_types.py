"""Run under torchrun with 2 gloo ranks: stage 1 with every negative type, sum fusion and the Combiner, on a global
batch of 8 split 4 + 4 and 3 + 5; rank 0 saves the parameter gradients to argv[1]."""

import sys

import torch.distributed as dist
from _dist import init_gloo, save_from_rank0  # this folder: the script's own
from conftest import tiny_model
from test_negative_types import negative_types_batch, negative_types_loss
from torch.nn.parallel import DistributedDataParallel


def main(out):
    init_gloo()
    rank = dist.get_rank()
    grads = {}
    for fusion in ("sum", "combiner"):
        for split, bounds in (("even", (0, 4, 8)), ("uneven", (0, 3, 8))):
            model = tiny_model("vit", fusion, seed=0).eval()  # no dropout: both runs must see the same function
            batch = negative_types_batch(model)
            local = {k: v[bounds[rank]:bounds[rank + 1]] for k, v in batch.items()}
            ddp = DistributedDataParallel(model)  # held until the backward: its hooks average the gradients
            negative_types_loss(ddp, model, local).backward()
            grads[f"{fusion}-{split}"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    save_from_rank0(grads, out)


if __name__ == "__main__":
    main(sys.argv[1])
