"""Stage 2 of SPN: InfoNCE against the frozen candidate bank, whole, sampled, or split over the ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from modeling_spn4cir.cir_contract import dot_similarity
from modeling_spn4cir.distributed import (
    batch_sizes,
    ddp_mean_correction,
    gather_no_grad,
    gather_with_grad,
    world,
)

from .in_batch import (
    SPN_CITATION,
    Similarity,
    fp32_scores,
    global_labels,
    mask_duplicates,
)


class CandidateBankLoss(nn.Module):
    """
    Stage 2 of SPN ("scaling negatives"): InfoNCE of each composed query against a frozen bank of every
    candidate image (~20k negatives on FashionIQ/CIRR), at the cost of one query-by-bank scoring — no image is
    encoded during training.

        loss = mean_i CE(similarity(q_i, bank) / tau, index(target_i))

    With `num_negatives=n`, each query is scored against its positive and `n` negatives drawn uniformly
    without replacement from the rest of the bank (the original code's `neg_num` with `random.sample`), for the
    number-of-negatives study; with `in_batch=True`, only against the bank rows of the global batch's targets (a
    target twice in the batch masked as in stage 1): stage 2 with stage 1's negatives, the study's smallest point.

    The bank (`[K, D]` or `[K, Q, D]`, any storage dtype) is converted once, here, to its compute dtype (fp32, or
    float64 for a float64 bank) and moved once to `device` (or, at the first step, to the query's device); no
    step copies or upcasts it. Scores are computed in fp32 whatever the storage dtype, so a half-precision bank
    never lowers the precision of an fp32 query or loss (it saves disk and host memory; on the device the bank
    is fp32: `K x D x 4` bytes, see `--shard_bank` to split it over the ranks).

    Inputs: `query_embeds` `[B, D]`, `target_index` `[B]` rows of the bank, `temperature` (optional override).
    """

    def __init__(self, bank: torch.Tensor, temperature: float = 0.02, num_negatives: int | None = None,
                 similarity: Similarity | None = None, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, in_batch: bool = False):
        super().__init__()
        if num_negatives is not None and not 0 < num_negatives < bank.shape[0]:
            raise ValueError(f"num_negatives must be in [1, {bank.shape[0] - 1}] for a bank of {bank.shape[0]}.")
        if in_batch and num_negatives is not None:
            raise ValueError("in_batch negatives are the batch's targets; they cannot be combined with num_negatives.")
        compute_dtype = torch.promote_types(bank.dtype, torch.float32)
        self.register_buffer("bank", bank.to(device=device if device is not None else bank.device,
                                             dtype=compute_dtype), persistent=False)
        self.temperature = temperature
        self.num_negatives = num_negatives
        self.similarity = similarity or dot_similarity
        self.generator = generator
        self.in_batch = in_batch

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
        if self.in_batch:
            return self._in_batch_loss(query_embeds, bank, target_index, tau)
        scores = fp32_scores(self.similarity, query_embeds, bank) / tau  # [B, K]
        correction = ddp_mean_correction(len(target_index))
        if self.num_negatives is None:
            return F.cross_entropy(scores, target_index) * correction
        candidates = torch.cat([target_index[:, None], self.sample_negatives(target_index)], dim=1)  # positive first
        return F.cross_entropy(scores.gather(1, candidates), torch.zeros_like(target_index)) * correction

    def _in_batch_loss(self, query_embeds, bank, target_index, tau) -> torch.Tensor:
        sizes = batch_sizes(len(target_index))
        rows = gather_no_grad(target_index, sizes)  # the global batch's targets, as rows of the frozen bank
        labels = global_labels(len(target_index), sizes, query_embeds.device)
        logits = mask_duplicates(fp32_scores(self.similarity, query_embeds, bank[rows]) / tau, labels, target_index,
                                 sizes)
        return F.cross_entropy(logits, labels) * ddp_mean_correction(len(labels), sizes)

    def get_config_dict(self) -> dict:
        negatives = "in-batch" if self.in_batch else self.num_negatives or "all"
        return {"temperature": float(self.temperature), "bank_size": int(self.bank.shape[0]),
                "num_negatives": negatives}

    @property
    def citation(self) -> str:
        return SPN_CITATION


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
        scores = fp32_scores(self.similarity, queries, bank) / tau  # [B_global, K_local]
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
