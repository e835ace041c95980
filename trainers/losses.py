"""Contrastive losses of SPN's two stages, as `nn.Module`s acting on embeddings.

The trainer runs the (possibly DDP-wrapped) model forward and hands the embeddings to these modules, so
DDP's gradient hooks see a normal forward; the maths lives here, not in the trainer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from modeling_spn4cir.cir_contract import dot_similarity
from modeling_spn4cir.distributed import ddp_mean_correction, gather_no_grad, gather_with_grad, world
from modeling_spn4cir.families import family_of

Similarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_SPN_CITATION = """@inproceedings{feng2024spn,
  title     = {Improving Composed Image Retrieval via Contrastive Learning with Scaling Positives and Negatives},
  author    = {Feng, Zhangchi and Zhang, Richong and Nie, Zhijie},
  booktitle = {ACM Multimedia},
  year      = {2024}
}"""


def _fp32_scores(similarity: Similarity, queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Scores in fp32 with autocast off: under fp16 autocast, logits / tau overflow and a learnable tau's gradient
    becomes NaN (GradScaler then skips steps); the scores are a small matmul, so fp32 costs little."""
    dtype = torch.promote_types(queries.dtype, torch.float32)  # never below fp32, never lower a float64 query
    with torch.autocast(queries.device.type, enabled=False):
        return similarity(queries.to(dtype), targets.to(dtype))


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
        rank, _ = world()
        all_targets, sizes = gather_with_grad(target_embeds)
        offset = sum(sizes[:rank])
        labels = torch.arange(query_embeds.shape[0], device=query_embeds.device) + offset
        tau = self.temperature if temperature is None else temperature
        logits = _fp32_scores(self.similarity, query_embeds, all_targets) / tau
        if target_keys is not None:
            all_keys = gather_no_grad(target_keys, sizes)
            same_image = target_keys[:, None] == all_keys[None, :]
            same_image[torch.arange(len(labels), device=labels.device), labels] = False
            logits = logits.masked_fill(same_image, float("-inf"))
        return F.cross_entropy(logits, labels) * ddp_mean_correction(len(labels), sizes)

    def loss_from_outputs(self, outputs, target_keys: torch.Tensor | None = None) -> torch.Tensor:
        """The trainer's entry: a model's forward output (`query_embeds`, `target_embeds`, optional
        learnable `temperature`)."""
        return self(outputs.query_embeds, outputs.target_embeds, target_keys, getattr(outputs, "temperature", None))

    def get_config_dict(self) -> dict:
        return {"temperature": float(self.temperature), "negatives": "global in-batch targets, duplicates masked"}

    @property
    def citation(self) -> str:
        return _SPN_CITATION


def stage1_loss_for(model, temperature, similarity: Similarity | None = None) -> nn.Module:
    """The stage-1 loss module for `model`: its config's `stage1_loss`, one of its family's objectives
    (`FamilySpec.stage1_losses`: TG-CIR's six terms, SPRC's itc + rtc + align, Bi-BLIP4CIR's forward + reverse), or
    plain `InBatchInfoNCELoss` (`"in_batch_infonce"`, the default) when the family brings none.

    Plain InfoNCE uses `temperature` (the trainer's tau) and the model's `similarity`; a family objective is built
    from the model's config (`from_config`), since it carries its own scales (TG-CIR's `loss_T`, SPRC's `temp`)."""
    name = getattr(model.config, "stage1_loss", None) or "in_batch_infonce"
    if name == "in_batch_infonce":
        return InBatchInfoNCELoss(temperature, similarity)
    spec = family_of(model)
    objectives = dict(spec.stage1_losses) if spec is not None else {}
    if name not in objectives:
        raise ValueError(f"{type(model).__name__} asks for stage-1 loss {name!r} (config.stage1_loss); its family "
                         f"has: {sorted(['in_batch_infonce', *objectives])}.")
    return objectives[name].from_config(model.config, temperature)


class CandidateBankLoss(nn.Module):
    """
    Stage 2 of SPN ("scaling negatives"): InfoNCE of each composed query against a frozen bank of every
    candidate image (~20k negatives on FashionIQ/CIRR), at the cost of one query-by-bank scoring — no image is
    encoded during training.

        loss = mean_i CE(similarity(q_i, bank) / tau, index(target_i))

    With `num_negatives=n`, each query is scored against its positive and `n` negatives drawn uniformly
    without replacement from the rest of the bank (the original code's `neg_num` with `random.sample`), for the
    number-of-negatives study.

    The bank (`[K, D]` or `[K, Q, D]`, any storage dtype) is converted once, here, to its compute dtype (fp32, or
    float64 for a float64 bank) and moved once to `device` (or, at the first step, to the query's device); no
    step copies or upcasts it. Scores are computed in fp32 whatever the storage dtype, so a half-precision bank
    never lowers the precision of an fp32 query or loss (it saves disk and host memory; on the device the bank
    is fp32: `K x D x 4` bytes, see `--shard_bank` to split it over the ranks).

    Inputs: `query_embeds` `[B, D]`, `target_index` `[B]` rows of the bank, `temperature` (optional override).
    """

    def __init__(self, bank: torch.Tensor, temperature: float = 0.02, num_negatives: int | None = None,
                 similarity: Similarity | None = None, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        if num_negatives is not None and not 0 < num_negatives < bank.shape[0]:
            raise ValueError(f"num_negatives must be in [1, {bank.shape[0] - 1}] for a bank of {bank.shape[0]}.")
        compute_dtype = torch.promote_types(bank.dtype, torch.float32)
        self.register_buffer("bank", bank.to(device=device if device is not None else bank.device,
                                             dtype=compute_dtype), persistent=False)
        self.temperature = temperature
        self.num_negatives = num_negatives
        self.similarity = similarity or dot_similarity
        self.generator = generator

    def _bank_on(self, device: torch.device) -> torch.Tensor:
        if self.bank.device != device:  # once: the buffer is replaced by its copy on the query's device
            self.bank = self.bank.to(device)
        return self.bank

    def sample_negatives(self, target_index: torch.Tensor) -> torch.Tensor:
        """`[B, n]` bank rows per query: a uniform random n-subset (no repeats) of the rows other than its target."""
        keys = torch.rand(len(target_index), self.bank.shape[0] - 1, generator=self.generator)
        draws = keys.topk(self.num_negatives, dim=1).indices.to(target_index.device)
        return draws + (draws >= target_index[:, None]).long()  # skip over the positive

    def forward(self, query_embeds: torch.Tensor, target_index: torch.Tensor, temperature=None) -> torch.Tensor:
        bank = self._bank_on(query_embeds.device)
        target_index = target_index.to(query_embeds.device)
        tau = self.temperature if temperature is None else temperature
        scores = _fp32_scores(self.similarity, query_embeds, bank) / tau  # [B, K]
        correction = ddp_mean_correction(len(target_index))
        if self.num_negatives is None:
            return F.cross_entropy(scores, target_index) * correction
        candidates = torch.cat([target_index[:, None], self.sample_negatives(target_index)], dim=1)  # positive first
        return F.cross_entropy(scores.gather(1, candidates), torch.zeros_like(target_index)) * correction

    def get_config_dict(self) -> dict:
        return {"temperature": float(self.temperature), "bank_size": int(self.bank.shape[0]),
                "num_negatives": self.num_negatives or "all"}

    @property
    def citation(self) -> str:
        return _SPN_CITATION


def shard_bounds(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows `[start, stop)` of a `num_rows` bank that rank `rank` of `world_size` holds with `--shard_bank`:
    contiguous blocks whose sizes differ by at most one."""
    return num_rows * rank // world_size, num_rows * (rank + 1) // world_size


class ShardedCandidateBankLoss(CandidateBankLoss):
    """
    The full-bank stage-2 InfoNCE with the bank split over the ranks (`--shard_bank`): each rank holds only the
    rows `[start, stop)` of the `num_rows`-row bank (`shard_bounds`), so the device memory of the bank per rank is
    1/W of the whole. The loss is exactly `CandidateBankLoss` on the whole bank:

    - every rank scores the *global* batch of queries (gathered with autograd) against its own rows;
    - the log-sum-exp over the whole bank is assembled from each rank's partial sum (`all_reduce` of the max,
      then of the sum of `exp(score - max)`, with autograd);
    - the positive's score comes from the rank that holds the target row (the others add 0);
    - each rank returns the mean over its own queries, scaled like `CandidateBankLoss` for DDP's averaging.

    The backward sends each rank's gradient of the shared log-sum-exp and positive scores to every rank (the
    autograd `all_reduce` sums them), and the gathered queries' gradients back to the rank that owns them, so
    the query side's gradients equal the unsharded loss's. Sampled negatives (`num_negatives`) are not supported.

    Inputs: `query_embeds` `[B, D]`, `target_index` `[B]` rows of the *whole* bank, `temperature`.
    """

    def __init__(self, bank_rows: torch.Tensor, start: int, num_rows: int, temperature: float = 0.02,
                 similarity: Similarity | None = None, device: torch.device | str | None = None):
        if bank_rows.shape[0] < 1:
            raise ValueError(f"--shard_bank: rank rows [{start}, {start}) are empty; a bank of {num_rows} images "
                             "cannot be split over more ranks than it has rows.")
        if not (0 <= start and start + bank_rows.shape[0] <= num_rows):
            raise ValueError(f"bank rows [{start}, {start + bank_rows.shape[0]}) are not inside a bank of {num_rows}.")
        super().__init__(bank_rows, temperature, None, similarity, device=device)
        self.start, self.stop, self.num_rows = int(start), int(start + bank_rows.shape[0]), int(num_rows)

    def forward(self, query_embeds: torch.Tensor, target_index: torch.Tensor, temperature=None) -> torch.Tensor:
        from torch.distributed.nn.functional import all_reduce as all_reduce_with_grad

        rank, world_size = world()
        bank = self._bank_on(query_embeds.device)
        target_index = target_index.to(query_embeds.device)
        tau = self.temperature if temperature is None else temperature
        queries, sizes = gather_with_grad(query_embeds)
        targets = gather_no_grad(target_index, sizes)
        scores = _fp32_scores(self.similarity, queries, bank) / tau  # [B_global, K_local]
        peak = scores.detach().amax(dim=1)
        if world_size > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        partial = (scores - peak[:, None]).exp().sum(dim=1)
        mine = (targets >= self.start) & (targets < self.stop)
        local = (targets - self.start).clamp(0, self.stop - self.start - 1)
        positive = torch.where(mine, scores.gather(1, local[:, None]).squeeze(1), torch.zeros_like(peak))
        if world_size > 1:
            partial = all_reduce_with_grad(partial)
            positive = all_reduce_with_grad(positive)
        per_query = peak + partial.log() - positive  # -log softmax(scores over the whole bank)[target]
        offset = sum(sizes[:rank])
        own = per_query[offset:offset + sizes[rank]]
        return own.mean() * ddp_mean_correction(len(own), sizes)

    def get_config_dict(self) -> dict:
        return {"temperature": float(self.temperature), "bank_size": self.num_rows, "num_negatives": "all",
                "sharded": True}
