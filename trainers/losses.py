"""Contrastive losses of SPN's two stages, as `nn.Module`s acting on embeddings.

The trainer runs the (possibly DDP-wrapped) model forward and hands the embeddings to these modules, so
DDP's gradient hooks see a normal forward; the maths lives here, not in the trainer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

_SPN_CITATION = """@inproceedings{feng2024spn,
  title     = {Improving Composed Image Retrieval via Contrastive Learning with Scaling Positives and Negatives},
  author    = {Feng, Zhangchi and Zhang, Richong and Nie, Zhijie},
  booktitle = {ACM Multimedia},
  year      = {2024}
}"""


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """All-gather `[B_r, ...]` from every rank into `[sum_r B_r, ...]`, keeping the autograd graph: the
    backward pass sums every rank's gradient for this rank's slice (a plain `all_gather` returns tensors
    without history, so the other ranks' loss terms would silently not reach this rank's parameters).
    Returns the gathered tensor and the per-rank sizes (ranks may hold uneven batches)."""
    rank, world = _world()
    if world == 1:
        return tensor, [tensor.shape[0]]
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    padded = F.pad(tensor, (0,) * (2 * (tensor.ndim - 1)) + (0, max(sizes) - tensor.shape[0]))
    from torch.distributed._functional_collectives import all_gather_single_autograd

    gathered = all_gather_single_autograd(padded.contiguous(), gather_dim=0, group=dist.group.WORLD)
    pieces = gathered.split(max(sizes))
    return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)]), sizes


def gather_no_grad(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All-gather a tensor without gradient (e.g. target keys), given the per-rank sizes."""
    if len(sizes) == 1:
        return tensor
    padded = F.pad(tensor, (0, max(sizes) - tensor.shape[0]))
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:n] for o, n in zip(out, sizes)])


class InBatchInfoNCELoss(nn.Module):
    """
    Stage 1 of SPN (and CLIP4Cir's fine-tuning): InfoNCE of each composed query against the targets of the
    *global* batch. Negatives: the other B_global - 1 targets (~128 in the original), at the cost of encoding
    every target image each step.

        loss = mean_i CE(q_i . [t_1 .. t_B]^T / tau, i)

    Across processes the target embeddings are gathered with autograd and each rank's labels are offset by
    the sizes of the ranks before it. A target image that appears twice in the global batch (same key) is
    masked out of the other query's negatives: it is a second copy of that query's positive, not a negative.

    Inputs: `query_embeds` `[B, D]`, `target_embeds` `[B, D]` (L2-normalized, row i is query i's target),
    `target_keys` `[B]` int64 ids of the target images (optional; enables duplicate masking).
    """

    def __init__(self, temperature: float = 0.02):
        super().__init__()
        self.temperature = temperature

    def forward(self, query_embeds: torch.Tensor, target_embeds: torch.Tensor,
                target_keys: torch.Tensor | None = None) -> torch.Tensor:
        rank, _ = _world()
        all_targets, sizes = gather_with_grad(target_embeds)
        offset = sum(sizes[:rank])
        labels = torch.arange(query_embeds.shape[0], device=query_embeds.device) + offset
        logits = query_embeds @ all_targets.to(query_embeds.dtype).T / self.temperature
        if target_keys is not None:
            all_keys = gather_no_grad(target_keys, sizes)
            same_image = target_keys[:, None] == all_keys[None, :]
            same_image[torch.arange(len(labels), device=labels.device), labels] = False
            logits = logits.masked_fill(same_image, float("-inf"))
        return F.cross_entropy(logits, labels)

    def get_config_dict(self) -> dict:
        return {"temperature": self.temperature, "negatives": "global in-batch targets, duplicates masked"}

    @property
    def citation(self) -> str:
        return _SPN_CITATION


class CandidateBankLoss(nn.Module):
    """
    Stage 2 of SPN ("scaling negatives"): InfoNCE of each composed query against a frozen bank of every
    candidate image (~20k negatives on FashionIQ/CIRR), at the cost of one `[B, D] x [D, K]` matmul — no
    image is encoded during training.

        loss = mean_i CE(q_i . bank^T / tau, index(target_i))

    With `num_negatives=n`, each query is scored against its positive and `n` negatives drawn uniformly
    from the rest of the bank (the original code's `neg_num`), for the number-of-negatives study.

    Inputs: `query_embeds` `[B, D]`, `target_index` `[B]` rows of the bank; the bank `[K, D]` is a buffer.
    """

    def __init__(self, bank: torch.Tensor, temperature: float = 0.02, num_negatives: int | None = None):
        super().__init__()
        if num_negatives is not None and not 0 < num_negatives < bank.shape[0]:
            raise ValueError(f"num_negatives must be in [1, {bank.shape[0] - 1}] for a bank of {bank.shape[0]}.")
        self.register_buffer("bank", bank, persistent=False)
        self.temperature = temperature
        self.num_negatives = num_negatives

    def forward(self, query_embeds: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
        bank = self.bank.to(device=query_embeds.device, dtype=query_embeds.dtype)
        target_index = target_index.to(query_embeds.device)
        if self.num_negatives is None:
            return F.cross_entropy(query_embeds @ bank.T / self.temperature, target_index)
        # Draw from [0, K - 1) and skip over the positive: uniform over the other K - 1 rows.
        draws = torch.randint(bank.shape[0] - 1, (len(target_index), self.num_negatives), device=bank.device)
        negatives = draws + (draws >= target_index[:, None]).long()
        candidates = torch.cat([target_index[:, None], negatives], dim=1)  # [B, 1 + n], positive first
        logits = torch.einsum("bd,bnd->bn", query_embeds, bank[candidates]) / self.temperature
        return F.cross_entropy(logits, torch.zeros_like(target_index))

    def get_config_dict(self) -> dict:
        return {"temperature": self.temperature, "bank_size": int(self.bank.shape[0]),
                "num_negatives": self.num_negatives or "all"}

    @property
    def citation(self) -> str:
        return _SPN_CITATION


class ImageTextInfoNCELoss(nn.Module):
    """
    CLIP's symmetric image-text contrastive loss (Radford et al., 2021): image i should match caption i among
    the batch's captions and vice versa. Used by the synthetic recipe's stage 0, which stands in for CLIP's
    web-scale pre-training; single process (no gather).

        loss = (CE(I . T^T / tau, diag) + CE(T . I^T / tau, diag)) / 2

    Inputs: `image_embeds`, `text_embeds` `[B, D]`, L2-normalized, row i of each describing pair i.
    """

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.temperature = temperature

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        logits = image_embeds @ text_embeds.T / self.temperature
        labels = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    def get_config_dict(self) -> dict:
        return {"temperature": self.temperature, "negatives": "in-batch images and captions"}
