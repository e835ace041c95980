"""SPN's study of negative types: stage-1 InfoNCE whose negatives replace one element of the triplet.

The original is `clip4cir/models_negtype.py` (`CIRPlus.forward`, `--neg_type` a bitmask; the selected InfoNCE losses
are averaged). For query i = fuse(reference_i, text_i) and target t_i, each type scores B candidates against one
fixed side, the right answer being the candidate built from triplet i:

- `target` (bit 4, the default): q_i against every target t_j of the batch (today's in-batch loss);
- `query` (bit 8): t_i against every query q_j (the transposed logits);
- `text` (bit 2): fuse(reference_i, text_j) against t_i, for every text j;
- `reference` (bit 1): fuse(reference_j, text_i) against t_i, for every reference j.

The paper (Figure 3): replacing the target gives the largest gain; the others give easy negatives (another text
rarely fits the reference) or false ones (an identical text or reference elsewhere in the batch composes the
positive again; the original masks nothing, and nor does this module for `text` / `reference`), and `text` /
`reference` cost B x B compositions.

Sum fusion (`normalize(reference + text)`, the original's study) composes the B x B queries in closed form from
three `[B, B]` matmuls; another fusion that composes feature vectors (CLIP4CIR's Combiner: `compose`) runs on
the B x B pairs in chunks under activation checkpointing, so its memory is one chunk's, whatever B.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from modeling_spn4cir.cir_contract import dot_similarity
from modeling_spn4cir.distributed import ddp_mean_correction, gather_with_grad

from .in_batch import (
    SPN_CITATION,
    Similarity,
    fp32_scores,
    global_labels,
    mask_duplicates,
)

NEGATIVE_TYPES = {"target": 4, "query": 8, "text": 2, "reference": 1}  # the original's --neg_type bits
DEFAULT_NEGATIVE_TYPES = ("target",)
CROSS_TYPES = ("text", "reference")  # they compose queries of pairs that are no triplet
_SUM_ORDER = ("query", "target", "text", "reference")  # the original adds the selected losses in this order
PAIRS_PER_CHUNK = 16384  # composed pairs held at once by the chunked path (activations of one chunk)

Compose = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_negative_types(negative_types: str | Iterable[str]) -> tuple[str, ...]:
    """The selected types, each once, in the original's order of summation; unknown or no type is an error that
    names the choices."""
    names = [negative_types] if isinstance(negative_types, str) else list(negative_types)
    unknown = [name for name in names if name not in NEGATIVE_TYPES]
    if unknown or not names:
        raise ValueError(f"unknown negative type(s) {unknown or names}: --negative_types takes one or more of "
                         f"{' '.join(NEGATIVE_TYPES)} (default: {' '.join(DEFAULT_NEGATIVE_TYPES)}).")
    return tuple(name for name in _SUM_ORDER if name in names)


def negative_types_from_bits(neg_type: int) -> tuple[str, ...]:
    """The types of the original's `--neg_type` bitmask (1..15)."""
    if not 0 < neg_type < 16:
        raise ValueError(f"--neg_type is a bitmask in 1..15 (8 query, 4 target, 2 text, 1 reference), got {neg_type}.")
    return check_negative_types([name for name, bit in NEGATIVE_TYPES.items() if neg_type & bit])


def sum_fusion_scores(fixed: torch.Tensor, varying: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`scores[i, j] = normalize(fixed_i + varying_j) . targets_i`: `fixed` `[b, D]`, `varying` `[N, D]` raw
    features, `targets` `[b, D]` L2-normalized -> `[b, N]`. Sum fusion is symmetric, so this is both cross type:
    `text` = (references, texts), `reference` = (texts, references). Without the `[b, N, D]` compositions:
    `(f_i . t_i + v_j . t_i) / sqrt(|f_i|^2 + |v_j|^2 + 2 f_i . v_j)` (the norm clamped as `F.normalize` does)."""
    numerator = (fixed * targets).sum(-1, keepdim=True) + targets @ varying.T
    squared = (fixed * fixed).sum(-1, keepdim=True) + (varying * varying).sum(-1)[None, :] + 2 * fixed @ varying.T
    return numerator / squared.clamp_min(0).sqrt().clamp_min(1e-12)


def composed_scores(compose: Compose, fixed: torch.Tensor, varying: torch.Tensor, targets: torch.Tensor,
                    vary: str, pairs_per_chunk: int = PAIRS_PER_CHUNK) -> torch.Tensor:
    """`scores[i, j] = compose(reference, text) . targets_i` with, for `vary="text"`, reference `fixed_i` and text
    `varying_j`, for `vary="reference"`, reference `varying_j` and text `fixed_i` (`fixed` `[b, D]`, `varying`
    `[N, D]`, `targets` `[b, D]`) -> `[b, N]`. The rows i go in chunks of `pairs_per_chunk // N` rows, each under
    activation checkpointing: only a chunk's `[rows, N]` scores stay for the backward, which composes it again."""
    n = varying.shape[0]

    def chunk_scores(rows: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        own = rows.repeat_interleave(n, dim=0)  # pair (i, j) at i * n + j
        others = varying.repeat(rows.shape[0], 1)
        queries = compose(own, others) if vary == "text" else compose(others, own)
        return torch.einsum("ijd,id->ij", queries.reshape(rows.shape[0], n, -1), chunk_targets)

    step = max(1, pairs_per_chunk // max(n, 1))
    return torch.cat([checkpoint(chunk_scores, fixed[a:a + step], targets[a:a + step], use_reentrant=False)
                      for a in range(0, fixed.shape[0], step)])


@dataclass
class _Batch:
    """This rank's rows (`queries`, `targets`, `references`, `texts` `[b, ...]`) and the global batch's
    (`all_*` `[B, ...]`, gathered with autograd where a type needs them), `labels` `[b]` their global positions."""

    queries: torch.Tensor
    targets: torch.Tensor
    references: torch.Tensor | None
    texts: torch.Tensor | None
    all_queries: torch.Tensor | None
    all_targets: torch.Tensor | None
    all_references: torch.Tensor | None
    all_texts: torch.Tensor | None
    labels: torch.Tensor
    sizes: list[int]


def _type_scores(kind: str, batch: _Batch, similarity: Similarity, compose: Compose | None,
                 pairs_per_chunk: int) -> torch.Tensor:
    """`[b, B]` scores (before the temperature) of this rank's rows against the global batch's candidates."""
    if kind == "target":
        return fp32_scores(similarity, batch.queries, batch.all_targets)
    if kind == "query":  # single-vector targets score by the dot product (the contract), as the original: t @ q.T
        if batch.targets.ndim == 2:
            return fp32_scores(dot_similarity, batch.targets, batch.all_queries)
        return fp32_scores(similarity, batch.all_queries, batch.targets).T
    fixed, varying = ((batch.references, batch.all_texts) if kind == "text" else (batch.texts, batch.all_references))
    dtype = torch.promote_types(fixed.dtype, torch.float32)
    fixed, varying, targets = fixed.to(dtype), varying.to(dtype), batch.targets.to(dtype)
    with torch.autocast(fixed.device.type, enabled=False):
        if compose is None:
            return sum_fusion_scores(fixed, varying, targets)
        return composed_scores(compose, fixed, varying, targets, kind, pairs_per_chunk)


def _mean_loss(types: tuple[str, ...], batch: _Batch, temperature, similarity: Similarity,
               compose: Compose | None = None, target_keys: torch.Tensor | None = None,
               pairs_per_chunk: int = PAIRS_PER_CHUNK) -> torch.Tensor:
    """The mean over `types` of each type's InfoNCE (a mean over this rank's rows), added in `types`' order. A
    target image twice in the batch (same key) is masked for `target` and `query`, as in `InBatchInfoNCELoss`."""
    total = 0.0
    for kind in types:
        logits = _type_scores(kind, batch, similarity, compose, pairs_per_chunk) / temperature
        if kind in ("target", "query"):
            logits = mask_duplicates(logits, batch.labels, target_keys, batch.sizes)
        total = total + F.cross_entropy(logits, batch.labels)
    return total / len(types)


def negative_type_loss(reference_features: torch.Tensor, text_features: torch.Tensor, target_embeds: torch.Tensor,
                       temperature, negative_types: str | Iterable[str]) -> torch.Tensor:
    """The loss of the original's negative-type study for sum fusion, on one process.

    Args:
        reference_features: `[B, D]` raw reference-image features.
        text_features: `[B, D]` raw modification-text features; query i = normalize(reference_i + text_i).
        target_embeds: `[B, D]` L2-normalized target embeddings.
        temperature: tau (float or tensor).
        negative_types: one or more of `target`, `query`, `text`, `reference`.

    Returns: the mean of the selected types' InfoNCE losses (a scalar), as `CIRPlus.forward` with the matching
    `--neg_type` bits."""
    types = check_negative_types(negative_types)
    queries = F.normalize(reference_features + text_features, dim=-1)
    labels = torch.arange(queries.shape[0], device=queries.device)
    batch = _Batch(queries, target_embeds, reference_features, text_features, queries, target_embeds,
                   reference_features, text_features, labels, [queries.shape[0]])
    return _mean_loss(types, batch, temperature, dot_similarity)


class NegativeTypeLoss(nn.Module):
    """
    Stage 1 with the negative types of SPN's study (see the module docstring): the mean of the selected types'
    InfoNCE losses, every type's negatives drawn from the *global* batch under DDP (queries, targets, reference and
    text features gathered with autograd, labels offset by the rank's position), so that W processes give the
    gradients of one process on the whole batch. `target` alone is `InBatchInfoNCELoss`.

    Args:
        negative_types: one or more of `target`, `query`, `text`, `reference`.
        temperature: tau (a learnable temperature can be passed per call instead).
        similarity: the model's scoring rule for `target` and `query` (default dot product).
        compose: `(reference_features [N, D], text_features [N, D]) -> [N, D]` normalized queries, the model's
            fusion for `text` and `reference` (chunked); None: sum fusion, in closed form.
        pairs_per_chunk: how many (reference, text) pairs `compose` runs on at once (its memory bound).

    Inputs: `query_embeds` `[B, D]`, `target_embeds` `[B, D]` (or `[B, Q, D]` for `target` / `query` only),
    `target_keys` `[B]` (optional duplicate masking), `temperature` (optional), and for `text` / `reference` the
    fusion's inputs `reference_features`, `text_features` `[B, D]` (`model_kwargs` asks the model for them).
    """

    def __init__(self, negative_types: str | Iterable[str] = DEFAULT_NEGATIVE_TYPES, temperature: float = 0.02,
                 similarity: Similarity | None = None, compose: Compose | None = None,
                 pairs_per_chunk: int = PAIRS_PER_CHUNK):
        super().__init__()
        self.negative_types = check_negative_types(negative_types)
        self.temperature = temperature
        self.similarity = similarity or dot_similarity
        self.compose, self.pairs_per_chunk = compose, pairs_per_chunk
        self.needs_fusion_features = any(kind in CROSS_TYPES for kind in self.negative_types)

    @property
    def model_kwargs(self) -> dict:
        """Extra `model(...)` arguments: the fusion's two inputs, for the types that compose other pairs."""
        return {"return_fusion_features": True} if self.needs_fusion_features else {}

    def forward(self, query_embeds: torch.Tensor, target_embeds: torch.Tensor, target_keys: torch.Tensor | None = None,
                temperature=None, reference_features: torch.Tensor | None = None,
                text_features: torch.Tensor | None = None) -> torch.Tensor:
        if self.needs_fusion_features and (reference_features is None or text_features is None):
            raise ValueError(f"negative types {list(self.negative_types)} compose other (reference, text) pairs: pass "
                             "the fusion's reference_features and text_features "
                             "(model(..., return_fusion_features=True)).")
        types = self.negative_types
        gathered, sizes = {}, None
        for name, tensor, wanted in (("queries", query_embeds, "query" in types),
                                     ("targets", target_embeds, "target" in types),
                                     ("references", reference_features, "reference" in types),
                                     ("texts", text_features, "text" in types)):
            if wanted:
                gathered[name], sizes = gather_with_grad(tensor)
        labels = global_labels(query_embeds.shape[0], sizes, query_embeds.device)
        batch = _Batch(query_embeds, target_embeds, reference_features, text_features, gathered.get("queries"),
                       gathered.get("targets"), gathered.get("references"), gathered.get("texts"), labels, sizes)
        tau = self.temperature if temperature is None else temperature
        loss = _mean_loss(types, batch, tau, self.similarity, self.compose, target_keys, self.pairs_per_chunk)
        return loss * ddp_mean_correction(len(labels), sizes)

    def loss_from_outputs(self, outputs, target_keys: torch.Tensor | None = None) -> torch.Tensor:
        """The trainer's entry: a model's forward output (`query_embeds`, `target_embeds`, the fusion features
        when asked for, an optional learnable `temperature`)."""
        return self(outputs.query_embeds, outputs.target_embeds, target_keys, getattr(outputs, "temperature", None),
                    getattr(outputs, "reference_features", None), getattr(outputs, "text_features", None))

    def get_config_dict(self) -> dict:
        fusion = "sum (closed form)" if self.compose is None else f"composed, {self.pairs_per_chunk} pairs per chunk"
        return {"temperature": float(self.temperature), "negative_types": list(self.negative_types),
                "negatives": "global batch", **({"fusion": fusion} if self.needs_fusion_features else {})}

    @property
    def citation(self) -> str:
        return SPN_CITATION
