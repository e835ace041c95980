"""Ranking benchmark: `trainers.evaluation` (chunked exact top-k) vs the straightforward approach of the
original CIR code (full argsort of the distance matrix, an N x M array of gallery names, string comparison).

    python benchmarks/bench_ranking.py            # CIRCO scale (120,000 x 640, 1,000 queries) and CIRR scale

Prints time and peak extra memory of both, and the ratios. Both compute FashionIQ-style recall@10/50 with the
reference kept, and the script checks that they agree.
"""

import argparse

import numpy as np
import torch

from benchmarks._measure import measure
from trainers.evaluation import fashioniq_metrics


def make_data(n_queries, n_gallery, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    gallery = torch.nn.functional.normalize(torch.randn(n_gallery, dim, generator=g), dim=-1)
    targets = torch.randint(n_gallery, (n_queries,), generator=g)
    # queries near their targets so that recall is not trivially 0
    queries = torch.nn.functional.normalize(gallery[targets] + 0.06 * torch.randn(n_queries, dim, generator=g), dim=-1)
    refs = torch.randint(n_gallery, (n_queries,), generator=g)
    ids = [f"{i:012d}" for i in range(n_gallery)]  # CIRCO-style zero-padded COCO ids
    return queries, gallery, ids, [ids[i] for i in refs], [ids[i] for i in targets]


def ours(queries, gallery, ids, refs, targets):
    return fashioniq_metrics(queries, gallery, ids, refs, targets)


def naive(queries, gallery, ids, refs, targets):
    distances = 1 - queries @ gallery.T
    sorted_indices = torch.argsort(distances, dim=-1)
    sorted_names = np.array(ids)[sorted_indices]
    labels = torch.tensor(sorted_names == np.repeat(np.array(targets), len(ids)).reshape(len(targets), -1))
    return {f"recall@{k}": (torch.sum(labels[:, :k]) / len(labels)).item() * 100 for k in (10, 50)}


def run(name, n_queries, n_gallery, dim):
    setup = (n_queries, n_gallery, dim)
    t_ours, m_ours, r_ours = measure(make_data, setup, ours)
    t_naive, m_naive, r_naive = measure(make_data, setup, naive)
    assert r_ours == r_naive, (r_ours, r_naive)
    print(f"{name}: {n_queries} queries x {n_gallery} gallery x D {dim}")
    print(f"  ours  : {t_ours:8.2f} s  peak +{m_ours:9.1f} MiB   {r_ours}")
    print(f"  naive : {t_naive:8.2f} s  peak +{m_naive:9.1f} MiB")
    print(f"  ratio : {t_naive / t_ours:8.1f}x faster, {m_naive / max(m_ours, 1):6.1f}x less memory")
    return t_ours, m_ours, t_naive, m_naive


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--circo_queries", type=int, default=1000)
    args = parser.parse_args()
    run("CIRR scale", 4181, 2297, 640)
    run("CIRCO scale", args.circo_queries, 120_000, 640)
