"""Gallery search benchmark: `CIRIndex.topk` exact (chunked `rank_topk`) vs the FAISS backend (HNSW graph, inner
product), on a clustered synthetic gallery (a Gaussian mixture of normalized vectors; real CIR embeddings are
clustered too, random ones would be the ANN worst case). Reports search time per query for both, the FAISS
graph's build time, and FAISS's recall@k against the exact top k, in one run.

    python -m benchmarks.bench_index [--n 200000] [--dim 256] [--queries 1000] [--k 10]
"""

import argparse
import time

import torch

from modeling_spn4cir.retrieval import CIRIndex


def clustered(centres, n, seed):
    g = torch.Generator().manual_seed(seed)
    assign = torch.randint(0, len(centres), (n,), generator=g)
    noise = torch.randn(n, centres.shape[1], generator=g)
    return torch.nn.functional.normalize(centres[assign] + 0.6 * noise, dim=-1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(2)
    centres = torch.randn(1000, args.dim, generator=torch.Generator().manual_seed(0))
    gallery, queries = clustered(centres, args.n, 1), clustered(centres, args.queries, 2)
    index = CIRIndex(gallery, [str(i) for i in range(args.n)], [None] * args.n, {"digest": "benchmark"})
    t0 = time.perf_counter()
    exact, _ = index.topk(queries, args.k)
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.topk(queries[:1], args.k, backend="faiss")  # builds the graph
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    approx, _ = index.topk(queries, args.k, backend="faiss")
    t_faiss = time.perf_counter() - t0
    recall = sum(len(set(a) & set(e)) for a, e in zip(approx.tolist(), exact.tolist())) / exact.numel()
    print(f"gallery {args.n} x {args.dim}, {args.queries} queries, top {args.k}")
    print(f"exact: {1000 * t_exact / args.queries:.2f} ms/query; faiss HNSW32: {1000 * t_faiss / args.queries:.3f} "
          f"ms/query ({t_exact / t_faiss:.1f}x faster), graph build {t_build:.1f} s; recall@{args.k} vs exact "
          f"{100 * recall:.2f}%")
