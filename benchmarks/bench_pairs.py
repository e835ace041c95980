"""Rank-window pairing benchmark: `datasets_scripts.pairing.rank_window_pairs` (exact, chunked) vs the naive
approach of the original code (the full N x N similarity matrix and its argsort held at once), N = 20,000,
D = 768, k = 1, window 10,000-20,000 (FashionIQ's), in one run. The pairs agree except where float rounding of
the differently blocked matmuls swaps two neighbours whose similarities differ in the last bits; the script
prints the agreement.

    python -m benchmarks.bench_pairs [--n 20000]
"""

import argparse

import torch

from benchmarks._measure import measure
from datasets_scripts.pairing import _draw_ranks, rank_window_pairs


def make_embeddings(n, dim, seed=0):
    return (torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1),)


def ours(embeddings):
    pairs = rank_window_pairs(embeddings, rank_min=10000, rank_max=20000, k=1, seed=42, show_progress_bar=False)
    return [(p.reference, p.target) for p in pairs]


def naive(embeddings):
    sims = embeddings @ embeddings.T
    sims.fill_diagonal_(float("inf"))  # rank 0 = the image itself, as in ours
    order = torch.sort(-sims, dim=1, stable=True).indices  # N x N int64, held at once
    ranks = _draw_ranks(len(embeddings), 1, 10000, min(20000, len(embeddings)), 42)
    return [(i, int(order[i, r])) for i in range(len(embeddings)) for r in ranks[i]]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=768)
    args = parser.parse_args()
    t_ours, m_ours, a = measure(make_embeddings, (args.n, args.dim), ours)
    t_naive, m_naive, b = measure(make_embeddings, (args.n, args.dim), naive)
    agreement = sum(x == y for x, y in zip(a, b)) / len(a)
    assert agreement > 0.99, f"the two methods disagree on {100 * (1 - agreement):.2f}% of the pairs"
    print(f"N = {args.n}, D = {args.dim}, window 10000-20000, k = 1; identical pairs: {100 * agreement:.2f}%")
    print(f"  ours  : {t_ours:7.2f} s  peak +{m_ours:8.1f} MiB")
    print(f"  naive : {t_naive:7.2f} s  peak +{m_naive:8.1f} MiB")
    print(f"  ratio : {t_naive / t_ours:7.2f}x time, {m_naive / max(m_ours, 1):6.1f}x less memory")
