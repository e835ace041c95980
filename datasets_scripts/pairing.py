"""Image pairing for SPN's positive scaling: for each reference, targets drawn from a window of its similarity
ranking, so that pairs are neither near-duplicates (rank < rank_min) nor unrelated (rank >= rank_max).

The ranking of reference i is every image sorted by cosine similarity to i, best first, with i itself at rank
0 and ties broken by lower index. It is exact and computed in chunks of references: memory O(chunk * N),
never an N x N similarity or argsort held at once. The draw is seeded and made before any ranking, so the
pairs do not depend on the chunk size (or on using faiss).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from modeling_spn4cir.retrieval import rank_topk


@dataclass
class Pair:
    reference: int  # index into the embedded images
    target: int
    rank: int | None  # the target's rank in the reference's ranking (None for random pairs)


def _draw_ranks(n_refs: int, k: int, rank_min: int, rank_max: int, seed: int) -> np.ndarray:
    """`[n_refs, k]` distinct ranks per reference, uniform in `[rank_min, rank_max)`."""
    window = rank_max - rank_min
    if window < k:
        raise ValueError(f"The rank window [{rank_min}, {rank_max}) holds {window} ranks; k={k} needs at least k.")
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(window, size=k, replace=False) for _ in range(n_refs)]) + rank_min


def rank_window_pairs(
    embeddings: torch.Tensor,
    reference_indices: Sequence[int] | None = None,
    rank_min: int = 10000,
    rank_max: int = 20000,
    k: int = 1,
    seed: int = 42,
    chunk_size: int = 256,
    backend: str = "torch",
    show_progress_bar: bool = True,
) -> list[Pair]:
    """
    Args:
        embeddings: `[N, D]` image embeddings (normalized here).
        reference_indices: which images act as references (default: all; `references_only` passes the
            annotated references).
        rank_min, rank_max: the window (clipped to N); FashionIQ 10000-20000, CIRR 10000-15000 in the paper.
        k: targets per reference (distinct ranks).
        backend: `"torch"` (exact chunked sort) or `"faiss"` (exact inner-product search; `pip install faiss-cpu`).
    """
    x = F.normalize(embeddings.float(), dim=-1)
    n = x.shape[0]
    refs = list(range(n)) if reference_indices is None else list(reference_indices)
    rank_max = min(rank_max, n)
    if not 0 < rank_min < rank_max:
        raise ValueError(f"Need 0 < rank_min < rank_max <= N={n}; got rank_min={rank_min}, rank_max={rank_max}.")
    ranks = _draw_ranks(len(refs), k, rank_min, rank_max, seed)
    pairs: list[Pair] = []
    if backend == "faiss":
        ranked_chunks = _faiss_rankings(x, refs, rank_max, chunk_size)
    elif backend == "torch":
        ranked_chunks = _torch_rankings(x, refs, rank_max, chunk_size)
    else:
        raise ValueError(f"backend must be 'torch' or 'faiss', got {backend!r}.")
    done = 0
    with tqdm(total=len(refs), desc="Ranking images", disable=not show_progress_bar) as bar:
        for ranked in ranked_chunks:  # [c, rank_max] image indices, best first
            for row in range(ranked.shape[0]):
                ref = refs[done + row]
                for r in ranks[done + row]:
                    pairs.append(Pair(ref, int(ranked[row, r]), int(r)))
            done += ranked.shape[0]
            bar.update(ranked.shape[0])
    return pairs


def _torch_rankings(x: torch.Tensor, refs: list[int], depth: int, chunk_size: int):
    for start in range(0, len(refs), chunk_size):
        idx = torch.tensor(refs[start:start + chunk_size])
        # The reference itself is rank 0, even among exact copies; the others follow, ties by lower index.
        others = rank_topk(x[idx], x, depth - 1, exclude=idx, chunk_size=chunk_size).indices
        yield torch.cat([idx[:, None], others], dim=1).numpy()


def _faiss_rankings(x: torch.Tensor, refs: list[int], depth: int, chunk_size: int):
    try:
        import faiss
    except ImportError as error:
        raise ImportError("backend='faiss' needs faiss: pip install 'spn4cir[faiss]' (faiss-cpu).") from error
    data = x.numpy().astype(np.float32)
    index = faiss.IndexFlatIP(data.shape[1])
    index.add(data)
    for start in range(0, len(refs), chunk_size):
        idx = refs[start:start + chunk_size]
        _, found = index.search(data[idx], depth)
        for row, ref in enumerate(idx):  # put the reference first, as in the torch backend
            rest = [j for j in found[row] if j != ref]
            found[row] = [ref] + rest[: depth - 1]
        yield found


def random_pairs(n: int, reference_indices: Sequence[int] | None = None, k: int = 1, seed: int = 42) -> list[Pair]:
    """Uniformly random targets (never the reference itself): the variant SPN uses for BLIP-family models and
    zero-shot CIR."""
    if n < 2:
        raise ValueError("Random pairing needs at least 2 images.")
    rng = np.random.default_rng(seed)
    refs = range(n) if reference_indices is None else reference_indices
    pairs = []
    for ref in refs:
        for t in rng.choice(n - 1, size=min(k, n - 1), replace=False):
            pairs.append(Pair(int(ref), int(t + (t >= ref)), None))
    return pairs
