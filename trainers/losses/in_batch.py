"""Stage 1 of SPN: in-batch InfoNCE, and what every loss of the package shares (the scores in fp32, the citation)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from modeling_spn4cir.cir_contract import dot_similarity
from modeling_spn4cir.distributed import (
    ddp_mean_correction,
    gather_no_grad,
    gather_with_grad,
    world,
)

Similarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SPN_CITATION = """@inproceedings{feng2024spn,
  title     = {Improving Composed Image Retrieval via Contrastive Learning with Scaling Positives and Negatives},
  author    = {Feng, Zhangchi and Zhang, Richong and Nie, Zhijie},
  booktitle = {ACM Multimedia},
  year      = {2024}
}"""


def fp32_scores(similarity: Similarity, queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Scores in fp32 with autocast off: under fp16 autocast, logits / tau overflow and a learnable tau's gradient
    becomes NaN (GradScaler then skips steps); the scores are a small matmul, so fp32 costs little."""
    dtype = torch.promote_types(queries.dtype, torch.float32)  # never below fp32, never lower a float64 query
    with torch.autocast(queries.device.type, enabled=False):
        return similarity(queries.to(dtype), targets.to(dtype))


def global_labels(local_size: int, sizes: list[int], device) -> torch.Tensor:
    """`[B_local]` positions of this rank's rows in the global batch: `arange(B_local)` offset by the sizes of the
    ranks before it."""
    return torch.arange(local_size, device=device) + sum(sizes[:world()[0]])


def mask_duplicates(logits: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor | None,
                    sizes: list[int]) -> torch.Tensor:
    """`logits` `[B_local, B_global]` with every column whose image key equals the row's own (`keys` `[B_local]`,
    gathered over the ranks) set to -inf, the positive `labels` column kept: a second copy of the positive is
    not a negative. No keys: `logits` unchanged."""
    if keys is None:
        return logits
    all_keys = gather_no_grad(keys, sizes)
    same_image = keys[:, None] == all_keys[None, :]
    same_image[torch.arange(len(labels), device=labels.device), labels] = False
    return logits.masked_fill(same_image, float("-inf"))


class InBatchInfoNCELoss(nn.Module):
    """
    Stage 1 of SPN (and CLIP4Cir's fine-tuning): InfoNCE of each composed query against the targets of the
    *global* batch. Negatives: the other B_global - 1 targets (~128 in the original), at the cost of encoding
    every target image each step.

        loss = mean_i CE(similarity(q_i, [t_1 .. t_B]) / tau, i)

    Across processes the target embeddings are gathered with autograd and each rank's labels are offset by
    the sizes of the ranks before it. A target image that appears twice in the global batch (same key) is
    masked out of the other query's negatives: it is a second copy of that query's positive, not a negative.

    Args:
        temperature: tau (a learnable temperature can be passed per call instead).
        similarity: the model's scoring rule (`model.similarity`; default dot product).

    Inputs: `query_embeds` `[B, D]`, `target_embeds` `[B, D]` or `[B, Q, D]` (row i is query i's target),
    `target_keys` `[B]` int64 ids of the target images (optional; enables duplicate masking), `temperature`
    (optional float or tensor overriding the module's).
    """

    model_kwargs: dict = {}

    def __init__(self, temperature: float = 0.02, similarity: Similarity | None = None):
        super().__init__()
        self.temperature = temperature
        self.similarity = similarity or dot_similarity

    def forward(self, query_embeds: torch.Tensor, target_embeds: torch.Tensor,
                target_keys: torch.Tensor | None = None, temperature=None) -> torch.Tensor:
        all_targets, sizes = gather_with_grad(target_embeds)
        labels = global_labels(query_embeds.shape[0], sizes, query_embeds.device)
        tau = self.temperature if temperature is None else temperature
        logits = fp32_scores(self.similarity, query_embeds, all_targets) / tau
        logits = mask_duplicates(logits, labels, target_keys, sizes)
        return F.cross_entropy(logits, labels) * ddp_mean_correction(len(labels), sizes)

    def loss_from_outputs(self, outputs, target_keys: torch.Tensor | None = None) -> torch.Tensor:
        """The trainer's entry: a model's forward output (`query_embeds`, `target_embeds`, optional
        learnable `temperature`)."""
        return self(outputs.query_embeds, outputs.target_embeds, target_keys, getattr(outputs, "temperature", None))

    def get_config_dict(self) -> dict:
        return {"temperature": float(self.temperature), "negatives": "global in-batch targets, duplicates masked"}

    @property
    def citation(self) -> str:
        return SPN_CITATION
