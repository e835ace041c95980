"""The one exact top-k ranker of the project: evaluation, positive-scaling pairing, the gallery index and the
retrieval report all rank with it.

Scores come from a `similarity(queries [c, D], gallery [M, ...]) -> [c, M]` callable — a CIR model's own
`similarity` (dot product, or SPRC's max over target tokens) — computed in query chunks, so memory is
O(chunk_size * M + N * k): never an N x M score matrix, argsort or array of ids held at once. Each chunk is scored
once: the ranked items' scores (and the ranks of items asked for, e.g. targets below the top k) come from the same
pass as their indices.

**Ties** are broken by gallery order: of two gallery items with the same score, the one listed first ranks higher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

DEFAULT_CHUNK_SIZE = 512
Similarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Ranked:
    """What the ranker returns for `N` queries, from one scoring pass.

    indices: `[N, k]` int64 gallery indices on the CPU, best first (ties by lower index);
    scores: `[N, k]` float32, each query's `similarity` with those items;
    ranks: `[N, T]` int64, the 1-based rank of each item of `rank_of` in its query's whole ranking (0 for the
    excluded item, which is not ranked), or None when no `rank_of` was given."""

    indices: torch.Tensor
    scores: torch.Tensor
    ranks: torch.Tensor | None = None


def dot_scores(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """`[c, D] x [M, D] -> [c, M]` (cosine for normalized inputs)."""
    return queries @ gallery.T


def _stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k column indices of each row of `scores` `[c, M]`, by score descending, ties by lower index."""
    values, indices = scores.topk(k, dim=1)
    threshold = values[:, -1:]
    # Order the k winners by index, then stable-sort by score: equal scores keep index order.
    indices = indices.sort(dim=1).values
    order = torch.sort(-scores.gather(1, indices), dim=1, stable=True).indices
    indices = indices.gather(1, order)
    # A tie at the k-th score can leave out a lower-index candidate that topk did not pick; redo those rows.
    at_least = (scores >= threshold).sum(dim=1)
    for row in torch.nonzero(at_least > k).flatten().tolist():
        candidates = torch.nonzero(scores[row] >= threshold[row]).flatten()
        order = torch.sort(-scores[row, candidates], stable=True).indices[:k]
        indices[row] = candidates[order]
    return indices


def _ranks_of(scores: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """1-based rank of each column `items` `[c, T]` in its row of `scores` `[c, M]` under the ranker's rule:
    1 + the better scores + the equal scores listed earlier. One item column at a time: memory O(c * M)."""
    positions = torch.arange(scores.shape[1], device=scores.device)
    ranks = torch.empty(items.shape, dtype=torch.long)
    for t in range(items.shape[1]):
        column = items[:, t : t + 1]
        own = scores.gather(1, column)
        earlier_ties = (scores == own) & (positions[None] < column)
        ranks[:, t] = (1 + (scores > own).sum(dim=1) + earlier_ties.sum(dim=1)).cpu()
    return ranks


def rank_topk(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    similarity: Similarity | None = None,
    exclude: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    show_progress_bar: bool = False,
    rank_of: torch.Tensor | None = None,
) -> Ranked:
    """
    Exact top-k of every query over the gallery, with the scores of the ranked items.

    Args:
        queries: `[N, D]`; gallery: `[M, D]` or `[M, Q, D]` (whatever `similarity` takes), on one device.
        k: ranking depth (capped at the number of rankable gallery items).
        similarity: scoring rule (default: dot product); inputs are used as given (normalize beforehand for cosine).
        exclude: `[N]` gallery index removed from each query's ranking (its reference, scored `-inf`), or None.
        chunk_size: queries scored at once.
        rank_of: `[N, T]` gallery indices whose rank in each query's whole ranking is wanted (`Ranked.ranks`,
            e.g. the targets of a report row), or None.

    Returns:
        [`Ranked`]: indices and scores `[N, min(k, M - (exclude is not None))]`, best first, ties by lower index.
    """
    similarity = similarity or dot_scores
    n, m = queries.shape[0], gallery.shape[0]
    k = max(min(k, m - (1 if exclude is not None else 0)), 0)
    indices, scores = torch.empty(n, k, dtype=torch.long), torch.empty(n, k, dtype=torch.float32)
    ranks = None if rank_of is None else torch.zeros(rank_of.shape, dtype=torch.long)
    if k == 0 and rank_of is None:
        return Ranked(indices, scores)
    from tqdm.auto import tqdm

    for start in tqdm(range(0, n, chunk_size), desc="Ranking", disable=not show_progress_bar):
        stop = min(start + chunk_size, n)
        with torch.no_grad():
            chunk = similarity(queries[start:stop], gallery).float()
        if exclude is not None:
            rows = torch.arange(chunk.shape[0], device=chunk.device)
            chunk[rows, exclude[start:stop].to(chunk.device)] = float("-inf")
        if k > 0:
            top = _stable_topk(chunk, k)
            indices[start:stop], scores[start:stop] = top.cpu(), chunk.gather(1, top).cpu()
        if rank_of is not None:
            ranks[start:stop] = _ranks_of(chunk, rank_of[start:stop].to(chunk.device))
    if ranks is not None and exclude is not None:
        ranks[rank_of == exclude.cpu()[:, None]] = 0
    return Ranked(indices, scores, ranks)


def rank_candidates(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    candidate_indices: torch.Tensor,
    similarity: Similarity | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Ranked:
    """Rank each query's own candidate set: `candidate_indices` `[N, S]` gallery indices -> [`Ranked`] with the
    same indices reordered by score (ties by lower gallery index), i.e. the full ranking restricted to the set,
    and their scores `[N, S]`."""
    similarity = similarity or dot_scores
    candidate_indices = candidate_indices.sort(dim=1).values
    indices, scores = torch.empty_like(candidate_indices), torch.empty(candidate_indices.shape, dtype=torch.float32)
    for start in range(0, queries.shape[0], chunk_size):
        rows = candidate_indices[start : start + chunk_size]
        with torch.no_grad():
            chunk = similarity(queries[start : start + chunk_size], gallery).float().cpu().gather(1, rows)
        order = torch.sort(-chunk, dim=1, stable=True).indices
        indices[start : start + rows.shape[0]] = rows.gather(1, order)
        scores[start : start + rows.shape[0]] = chunk.gather(1, order)
    return Ranked(indices, scores)


__all__ = ["DEFAULT_CHUNK_SIZE", "Ranked", "Similarity", "rank_topk", "rank_candidates", "dot_scores"]
