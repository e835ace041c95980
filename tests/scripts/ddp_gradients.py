"""Run under `torchrun --standalone --nproc_per_node 2`: DDP on a global batch split across 2 gloo ranks; rank 0
saves the parameter gradients of stage 1 (in-batch loss) and stage 2 (candidate-bank loss) to argv[1]."""

import sys

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from _dist import init_gloo, save_from_rank0  # this folder: the script's own
from conftest import tiny_model
from test_losses import global_batch, stage_loss


def main(out):
    init_gloo()
    rank = dist.get_rank()
    grads = {}
    for stage, split in (("in_batch", "even"), ("candidate_bank", "even"), ("in_batch", "uneven"),
                         ("candidate_bank", "uneven")):
        model = tiny_model("vit", "combiner", seed=0)
        model.eval()  # no dropout: both runs must see the same function
        if stage == "candidate_bank":
            model.freeze_target_side()
        batch = global_batch(model)
        # even: 4 + 4 rows; uneven: 3 + 5 rows (the global batch is the same 8 rows)
        bounds = (0, 4, 8) if split == "even" else (0, 3, 8)
        local = {k: v[bounds[rank]:bounds[rank + 1]] if k != "bank" else v for k, v in batch.items()}
        ddp = DistributedDataParallel(model)
        loss = stage_loss(ddp, model, local, stage)
        loss.backward()
        grads[f"{stage}-{split}"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    save_from_rank0(grads, out)


if __name__ == "__main__":
    main(sys.argv[1])
