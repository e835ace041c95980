"""Run under `torchrun --standalone --nproc_per_node 2`: LoRA (stage 1 and stage 2) under DDP, a global batch of 8
split 4 + 4 across 2 gloo ranks; rank 0 saves the gradients of the trainable (adapter) parameters to argv[1]."""

import sys

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from _dist import init_gloo, save_from_rank0  # this folder: the script's own
from test_lora import lora_model
from test_losses import global_batch, stage_loss


def main(out):
    init_gloo()
    rank = dist.get_rank()
    grads = {}
    for stage in ("in_batch", "candidate_bank"):
        peft_model, base = lora_model(stage)
        batch = global_batch(base)
        local = {k: v[4 * rank:4 * rank + 4] if k != "bank" else v for k, v in batch.items()}
        ddp = DistributedDataParallel(peft_model)
        stage_loss(ddp, base, local, stage).backward()
        grads[stage] = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}
    save_from_rank0(grads, out)


if __name__ == "__main__":
    main(sys.argv[1])
