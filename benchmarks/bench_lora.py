"""LoRA vs full fine-tuning, stage 1 (in-batch) and stage 2 (candidate bank): trainable parameters, peak extra
memory of the training steps (gradients, AdamW state, activations) and step time, CPU, random init, one run.

    python -m benchmarks.bench_lora [--batch 4] [--steps 2] [--rank 16] [--bank 20000]

Geometries: CLIP RN50x4 at 288 px and CLIP ViT-B/32 at 224 px (`bench_stages.GEOMETRIES`), modification texts of
24 tokens. LoRA: the defaults of `trainers.lora` (attention + MLP projections of the towers that train; stage 2 only
the query side; projection heads trained in full), rank `--rank`, alpha 2 x rank. A step = forward, loss, backward
and an AdamW update over the trainable parameters. Every variant runs in its own spawned process of the same script
run (`benchmarks._measure`), so the memory of one cannot hide in another's freed pages; docs/benchmarks.md reports
ratios.
"""

import argparse
import time

import torch

from benchmarks._measure import measure
from benchmarks.bench_stages import GEOMETRIES
from modeling_spn4cir import CLIP4CIRConfig, CLIP4CIRModel
from trainers.lora import LoRAArguments, apply_lora
from trainers.losses import CandidateBankLoss, InBatchInfoNCELoss


def setup(geometry, stage, lora_rank, batch, bank_size, text_len=24):
    torch.manual_seed(0)
    model = CLIP4CIRModel(CLIP4CIRConfig(**GEOMETRIES[geometry])).train()
    size, dim = model.config.image_size, model.config.projection_dim
    ids = torch.randint(1, 49000, (batch, text_len))
    ids[:, -1] = 49407
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(batch, 3, size, size)}
    if stage == "candidate_bank":
        model.freeze_target_side()
        with torch.no_grad():
            inputs["reference_features"] = model.get_reference_features(inputs.pop("pixel_values"))
        bank = torch.nn.functional.normalize(torch.randn(bank_size, dim), dim=-1)
        loss_fn = CandidateBankLoss(bank, 0.02)
        target_index = torch.randint(bank_size, (batch,))
    else:
        inputs["target_pixel_values"] = torch.randn(batch, 3, size, size)
        loss_fn, target_index = InBatchInfoNCELoss(0.02), None
    if lora_rank:
        model = apply_lora(model, LoRAArguments(lora_r=lora_rank, lora_alpha=2.0 * lora_rank), stage)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-6)
    return model, inputs, loss_fn, target_index, optimizer, trainable


def train_steps(model, inputs, loss_fn, target_index, optimizer, trainable, steps=2):
    def step():
        out = model(**inputs)
        if target_index is None:
            loss = loss_fn(out.query_embeds, out.target_embeds)
        else:
            loss = loss_fn(out.query_embeds, target_index)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocates gradients and the AdamW state
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return sum(p.numel() for p in trainable), (time.perf_counter() - t0) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--bank", type=int, default=20000)
    args = parser.parse_args(argv)
    print(f"batch {args.batch}, {args.steps} timed steps after 1 warm-up, LoRA rank {args.rank}, bank {args.bank}, "
          f"CPU, {torch.get_num_threads()} threads in this process, 2 in each measured one")
    print("| geometry | stage | trainable full / LoRA | peak extra memory full / LoRA | step time full / LoRA |")
    print("|---|---|---|---|---|")
    for geometry in GEOMETRIES:
        for stage in ("in_batch", "candidate_bank"):
            runs = {}
            for rank in (0, args.rank):
                _, mib, (params, step) = measure(
                    setup, (geometry, stage, rank, args.batch, args.bank), train_steps)
                runs[rank] = (params, mib, step)
            (p0, m0, s0), (p1, m1, s1) = runs[0], runs[args.rank]
            print(f"| {geometry} | {stage} | {p0 / 1e6:.1f}M / {p1 / 1e6:.2f}M (**{p0 / p1:.0f}x fewer**) | "
                  f"{m0:.0f} / {m1:.0f} MiB (**{m0 / max(m1, 1):.1f}x**) | {s0:.2f} / {s1:.2f} s "
                  f"(**{s0 / s1:.2f}x**) |", flush=True)


if __name__ == "__main__":
    main()
