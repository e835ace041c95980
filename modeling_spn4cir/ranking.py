"""The one exact top-k ranker of the project: evaluation, positive-scaling pairing and retrieval all rank with it.

Scores come from a `similarity(queries [c, D], gallery [M, ...]) -> [c, M]` callable — a CIR model's own
`similarity` (dot product, or SPRC's max over target tokens) — computed in query chunks, so memory is
O(chunk_size * M + N * k): never an N x M score matrix, argsort or array of ids held at once.

**Ties** are broken by gallery order: of two gallery items with the same score, the one listed first ranks higher.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

DEFAULT_CHUNK_SIZE = 512
Similarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


def rank_topk(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    similarity: Similarity | None = None,
    exclude: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    show_progress_bar: bool = False,
) -> torch.Tensor:
    """
    Exact top-k of every query over the gallery.

    Args:
        queries: `[N, D]`; gallery: `[M, D]` or `[M, Q, D]` (whatever `similarity` takes), on one device.
        k: ranking depth (capped at the number of rankable gallery items).
        similarity: scoring rule (default: dot product); inputs are used as given (normalize beforehand for cosine).
        exclude: `[N]` gallery index removed from each query's ranking (its reference), or None.
        chunk_size: queries scored at once.

    Returns:
        `[N, min(k, M - (exclude is not None))]` int64 gallery indices on the CPU, best first, ties by lower index.
    """
    similarity = similarity or dot_scores
    n, m = queries.shape[0], gallery.shape[0]
    k = min(k, m - (1 if exclude is not None else 0))
    ranked = torch.empty(n, max(k, 0), dtype=torch.long)
    if k <= 0:
        return ranked
    from tqdm.auto import tqdm

    for start in tqdm(range(0, n, chunk_size), desc="Ranking", disable=not show_progress_bar):
        with torch.no_grad():
            scores = similarity(queries[start : start + chunk_size], gallery).float()
        if exclude is not None:
            rows = torch.arange(scores.shape[0], device=scores.device)
            scores[rows, exclude[start : start + chunk_size].to(scores.device)] = float("-inf")
        ranked[start : start + scores.shape[0]] = _stable_topk(scores, k).cpu()
    return ranked


def rank_candidates(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    candidate_indices: torch.Tensor,
    similarity: Similarity | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Rank each query's own candidate set: `candidate_indices` `[N, S]` gallery indices -> the same indices
    reordered by score (ties by lower gallery index), i.e. the full ranking restricted to the set."""
    similarity = similarity or dot_scores
    candidate_indices = candidate_indices.sort(dim=1).values
    out = torch.empty_like(candidate_indices)
    for start in range(0, queries.shape[0], chunk_size):
        rows = candidate_indices[start : start + chunk_size]
        with torch.no_grad():
            scores = similarity(queries[start : start + chunk_size], gallery).float().cpu()
        order = torch.sort(-scores.gather(1, rows), dim=1, stable=True).indices
        out[start : start + rows.shape[0]] = rows.gather(1, order)
    return out


__all__ = ["DEFAULT_CHUNK_SIZE", "rank_topk", "rank_candidates", "dot_scores"]
