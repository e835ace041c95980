"""Gallery search benchmark at 1M images: `CIRIndex.topk` exact (chunked `rank_topk`) against the FAISS backend's
IVF-PQ index (and, with `--hnsw_n`, its HNSW graph on a smaller gallery), on a clustered synthetic gallery (a
Gaussian mixture of normalized vectors; real CIR embeddings are clustered too, random ones would be the ANN worst
case). One run reports, per backend: the build time, the search time per query, recall@k against the exact top k,
the index's size on disk and, for IVF-PQ, the time to load the saved index (what every later `CIRIndex.load` pays
instead of the build); with the date and the machine's load average before and after, since the numbers depend on
both.

    python -m benchmarks.bench_index                      # 1M x 256, 500 queries: IVF-PQ at nprobe 8/16/32/64
    python -m benchmarks.bench_index --hnsw_n 50000       # also HNSW on the first 50k images
    python -m benchmarks.bench_index --n 200000 --nlist 0  # nlist 0: the library's default, 4 sqrt(N)

The default run takes about 4 minutes on 2 idle cores (IVF-PQ with 1024 cells: the library's default at 1M, 4096
cells, trains for minutes there; on 16 cores it is a minute).
"""

import argparse
import datetime
import os
import tempfile
import time

import torch

from modeling_spn4cir.retrieval import CIRIndex, FaissSettings


def clustered(centres, n, seed, spread=0.6, chunk=2**17):
    """`n` normalized points around `centres` (`[C, D]`), built in chunks (1M x 256 would need 3 temporaries)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, centres.shape[1])
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        assign = torch.randint(0, len(centres), (rows,), generator=g)
        out[start:start + rows] = centres[assign] + spread * torch.randn(rows, centres.shape[1], generator=g)
    return torch.nn.functional.normalize(out, dim=-1, out=out)


def recall(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return sum(len(set(a) & set(e)) for a, e in zip(approx.tolist(), exact.tolist())) / exact.numel()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def bench_faiss(index: CIRIndex, queries, exact, k, settings: FaissSettings, probes, label: str,
                refines=()) -> None:
    faiss_index, build = timed(lambda: index.build_faiss(settings))
    with tempfile.TemporaryDirectory() as folder:
        faiss_index.save(folder, "benchmark")
        size = os.path.getsize(os.path.join(folder, "faiss.index"))
        _, reload = timed(lambda: type(faiss_index).load(folder, "benchmark", *index.embeddings.shape))
    print(f"{label} {faiss_index!r}: build {build:.1f} s, {size / 2**20:.0f} MiB on disk "
          f"({size / len(index):.1f} bytes per image), load of the saved index {reload:.2f} s")
    for probe in probes:
        search = {"nprobe": probe} if settings.kind == "ivfpq" else {"ef_search": probe}
        (approx, _), seconds = timed(lambda search=search: index.topk(queries, k, backend="faiss", **search))
        name = "nprobe" if settings.kind == "ivfpq" else "efSearch"
        print(f"  {name} {probe:>4}: {1000 * seconds / len(queries):7.3f} ms/query, recall@{k} vs exact "
              f"{100 * recall(approx, exact):.2f}% ({faiss_index.settings.refine * k} candidates re-scored)")
    for refine in refines:
        (approx, _), seconds = timed(lambda refine=refine: index.topk(queries, k, backend="faiss", refine=refine))
        print(f"  refine {refine:>4} ({refine * k} candidates): {1000 * seconds / len(queries):7.3f} ms/query, "
              f"recall@{k} vs exact {100 * recall(approx, exact):.2f}%")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nlist", type=int, default=1024, help="IVF cells (0: the library's default, 4 sqrt(N))")
    parser.add_argument("--m", type=int, default=32, help="PQ codes per image (bytes at 8 bits)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--refine", type=int, nargs="+", default=[0, 10, 200],
                        help="candidates re-scored per result: the first for the nprobe sweep (0: the library's "
                             "default, 50), then each at the index's nprobe")
    parser.add_argument("--hnsw_n", type=int, default=0, help="also an HNSW graph over the first N images (0: no)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs, {args.threads} threads, load average "
          f"{load()} (1/5/15 min)")
    centres = torch.randn(1000, args.dim, generator=torch.Generator().manual_seed(0))
    (gallery, queries), seconds = timed(lambda: (clustered(centres, args.n, 1), clustered(centres, args.queries, 2)))
    print(f"gallery {args.n:,} x {args.dim} float32 ({gallery.numel() * 4 / 2**30:.2f} GiB, made in {seconds:.0f} s), "
          f"{args.queries} queries, top {args.k}")
    index = CIRIndex(gallery, [str(i) for i in range(args.n)], [None] * args.n, {"digest": "benchmark"})
    (exact, _), seconds = timed(lambda: index.topk(queries, args.k))
    print(f"exact: {1000 * seconds / args.queries:.2f} ms/query ({seconds:.1f} s)")
    settings = FaissSettings(kind="ivfpq", nlist=args.nlist, m=args.m, refine=args.refine[0])
    bench_faiss(index, queries, exact, args.k, settings, args.nprobe, "IVF-PQ", args.refine[1:])
    if args.hnsw_n:
        small = CIRIndex(gallery[: args.hnsw_n], index.image_ids[: args.hnsw_n], [None] * args.hnsw_n, {})
        (small_exact, _), seconds = timed(lambda: small.topk(queries, args.k))
        print(f"{args.hnsw_n:,} images: exact {1000 * seconds / args.queries:.2f} ms/query")
        bench_faiss(small, queries, small_exact, args.k, FaissSettings(kind="hnsw", refine=args.refine[0]),
                    [256, 512], "HNSW")
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
