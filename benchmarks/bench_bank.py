"""The candidate bank at scale: the stage-2 loss step against its floor, its peak memory, and the bank build's
throughput with DataLoader workers, in one run.

    python -m benchmarks.bench_bank [--sizes 20000 100000 1000000] [--batch 256] [--width 640] [--repeats 3]
                                    [--images 96] [--workers 0 1 2] [--extra_share 0.98] [--json PATH]

Loss: synthetic L2-normalized embeddings of the RN50x4 width (640), a batch of 256 queries, the whole bank as
negatives. A step is `CandidateBankLoss(bank)(queries, targets)` + backward to the queries, with the bank held by
the loss as it is in training; its floor is the bare `cross_entropy(queries @ bank.T / tau, targets)` + backward
on preallocated tensors. Each size runs in a fresh spawned process; the step and its floor alternate there
(`--repeats` times each, after a warm-up) and the medians are reported, so both see the same machine load.
`peak_mib` is the resident memory the first step adds above the process after setup (bank, queries), sampled
every 2 ms, in a separate process with a fixed malloc mmap threshold (so freed tensors leave the resident set and
the sampling thread does not slow the timed steps): the [B, K] scores, their softmax gradient, the query gradient.

`--extra_share s`: the last share s of each bank's rows are extra negatives (`--bank_extra_images`), held as the
trainer holds them (`candidate_bank_loss` over `CandidateBank.negatives`; the queries' targets are triplet rows),
and the row reports the seconds `extra_candidates` takes to pick their ids from a pool of new ids (ids only).

Build: `load_or_build_candidate_bank` (in memory: content hashing, decoding, preprocessing at 288 px, encoding)
over `--images` real PNGs of 800 x 1000 written to a temporary directory, with 0, 1 and 2 DataLoader workers.
The model is a tiny CLIP4CIR (640-d output) so that the number measures the data path that workers parallelize
(decode + preprocess, 20-30 ms per image), not a CPU forward of RN50x4.

`--json PATH` writes `{"rows": [{"bank_size", "step_s", "floor_s", "overhead", "peak_mib"[, "extra_rows",
"select_extra_ids_s"]}, ...],
"build": [{"workers", "images_per_s"}, ...]}`.
"""

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._measure import peak_rss_mib, spawn


def _loss_child(bank_size, batch, width, repeats, mode, extra_share, queue):
    import torch
    import torch.nn.functional as F

    from trainers.losses import CandidateBankLoss

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(bank_size, width, generator=g), dim=-1)
    queries = F.normalize(torch.randn(batch, width, generator=g), dim=-1).requires_grad_()
    tau = 0.02
    extras = {}
    if extra_share:
        loss_fn, extras = _with_extra_negatives(bank, extra_share, tau)
        bank = loss_fn.bank
    else:
        loss_fn = CandidateBankLoss(bank, tau, device="cpu")  # the bank as training holds it (moved once)
    targets = torch.randint(bank_size - extras.get("extra_rows", 0), (batch,), generator=g)  # triplet rows only

    def step():
        queries.grad = None
        loss_fn(queries, targets).backward()

    def floor():
        queries.grad = None
        F.cross_entropy(queries @ bank.T / tau, targets).backward()

    if mode == "peak":
        queue.put(_peak_mib(step))
        return
    step(), floor()  # warm-up
    times = {"step": [], "floor": []}
    for r in range(repeats):  # alternating which goes first, so that neither gains from the order
        for name, fn in ((("step", step), ("floor", floor)) if r % 2 == 0 else (("floor", floor), ("step", step))):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    step_s, floor_s = statistics.median(times["step"]), statistics.median(times["floor"])
    queue.put({"bank_size": bank_size, "step_s": step_s, "floor_s": floor_s, "overhead": step_s / floor_s,
               **extras})


def _with_extra_negatives(bank, extra_share, tau):
    """The loss as the trainer builds it for a bank whose last `extra_share` of rows are extra negatives
    (`candidate_bank_loss` over `CandidateBank.negatives`), and the seconds `extra_candidates` takes to pick those
    rows' ids out of a pool of new ids (each looked up against the triplets and the de-duplication map; no image
    is read)."""
    import datasets
    import torch

    from modeling_spn4cir.image_store import ImageStore
    from modeling_spn4cir.cir_contract import dot_similarity
    from trainers.bank_extras import ExtraImages, extra_candidates
    from trainers.candidate_bank import CandidateBank, ExtraNegatives
    from trainers.cir_trainer import CIRTrainingArguments, candidate_bank_loss

    extra_rows = int(len(bank) * extra_share)
    triplet_ids = [f"t{i}" for i in range(len(bank) - extra_rows)]
    pool_ids = [f"u{i}" for i in range(extra_rows)]
    train = ImageStore(datasets.Dataset.from_dict({"image_id": triplet_ids}))
    pool = ImageStore(datasets.Dataset.from_dict({"image_id": pool_ids}))
    candidate = CandidateBank(triplet_ids, bank[:len(triplet_ids)], torch.empty(len(triplet_ids), 0), {})
    t0 = time.perf_counter()
    ids, _ = extra_candidates(ExtraImages(pool, pool_ids, "bench"), candidate, train)
    select_s = time.perf_counter() - t0
    candidate.extra = ExtraNegatives(ids, bank[len(triplet_ids):], {})
    args = CIRTrainingArguments(output_dir=tempfile.mkdtemp(), stage="candidate_bank", use_cpu=True, report_to=[])
    loss_fn = candidate_bank_loss(candidate, args, tau, dot_similarity)
    return loss_fn, {"extra_rows": extra_rows, "select_extra_ids_s": select_s}


def _peak_mib(fn) -> float:
    """Resident memory `fn()` adds at its peak. Run in a process started with a fixed malloc mmap threshold, so that
    every large tensor is mapped when allocated and unmapped when freed."""
    return peak_rss_mib(fn)[0]


def _make_images(folder: Path, n: int) -> list[str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    yy, xx = np.mgrid[0:1000, 0:800]
    for i in range(n):
        # a photo-like image: smooth gradients plus mild noise (PNG of about 1-2 MB, like a product photo)
        base = np.stack([(xx * (i + 1) % 256), (yy * 3 % 256), ((xx + yy) // 4 % 256)], -1).astype(np.int16)
        noise = rng.integers(-12, 13, base.shape)
        array = np.clip(base + noise, 0, 255).astype(np.uint8)
        path = folder / f"img{i:04d}.png"
        Image.fromarray(array).save(path)
        paths.append(str(path))
    return paths


def _tiny_model():
    from modeling_spn4cir import CLIP4CIRConfig, CLIP4CIRModel

    config = CLIP4CIRConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=640, eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=288, patch_size=32, projection_dim=640),
        projection_dim=640,
    )
    return CLIP4CIRModel(config).eval()


def _build(paths, workers, queue):
    import datasets
    import torch

    from modeling_spn4cir import CLIP4CIRImageProcessor
    from modeling_spn4cir.image_store import ImageStore
    from trainers.candidate_bank import load_or_build_candidate_bank

    # a spawned child's default start method is spawn; DataLoader workers fork, as in a training run on Linux
    mp.set_start_method("fork", force=True)
    torch.set_num_threads(1)  # the main process encodes; workers take the other core(s)
    ids = [Path(p).stem for p in paths]
    corpus = datasets.Dataset.from_dict({"image_id": ids, "image": paths}).cast_column("image", datasets.Image())
    model = _tiny_model()
    processor = CLIP4CIRImageProcessor(size=288)
    load_or_build_candidate_bank(model, ImageStore(corpus), ids[:8], processor, batch_size=8,
                                 show_progress_bar=False, num_workers=workers)  # warm-up
    t0 = time.perf_counter()
    load_or_build_candidate_bank(model, ImageStore(corpus), ids, processor, batch_size=16, show_progress_bar=False,
                                 num_workers=workers)
    queue.put({"workers": workers, "images_per_s": len(ids) / (time.perf_counter() - t0)})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 1_000_000])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2], help="none: skip the build part")
    parser.add_argument("--extra_share", type=float, default=None,
                        help="this share of each bank's rows are extra negatives (--bank_extra_images)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)

    rows = []
    print(f"stage-2 loss step (batch {args.batch}, width {args.width}, fp32) vs floor (matmul + cross-entropy)")
    print("| bank size | step (s) | floor (s) | step / floor | peak extra memory (MiB) |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        row = spawn(_loss_child, size, args.batch, args.width, args.repeats, "time", args.extra_share)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # the peak's own process: freed tensors leave the RSS
        try:
            row["peak_mib"] = spawn(_loss_child, size, args.batch, args.width, args.repeats, "peak", args.extra_share)
        finally:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        rows.append(row)
        extra = (f" ({row['extra_rows']:,} extra negatives, their ids picked in {row['select_extra_ids_s']:.2f} s)"
                 if args.extra_share else "")
        print(f"| {size:,}{extra} | {row['step_s']:.4f} | {row['floor_s']:.4f} | {row['overhead']:.2f}x | "
              f"{row['peak_mib']:.0f} |", flush=True)

    build = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = _make_images(Path(tmp), args.images) if args.workers else []
        size_mb = sum(Path(p).stat().st_size for p in paths) / max(len(paths), 1) / 2**20
        if args.workers:
            print(f"\nbank build, {args.images} PNGs of 800x1000 ({size_mb:.1f} MB each) at 288 px")
            print("| DataLoader workers | images / s |")
            print("|---|---|")
        for workers in args.workers:
            result = spawn(_build, paths, workers)
            build.append(result)
            print(f"| {workers} | {result['images_per_s']:.1f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "build": build}, indent=2))
    return {"rows": rows, "build": build}


if __name__ == "__main__":
    main()
