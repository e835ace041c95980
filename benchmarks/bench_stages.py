"""Per-sample cost of a stage-1 step (in-batch: both towers forward + backward) vs a stage-2 step (candidate
bank: text tower only + one bank matmul) on the same model, CPU, random init, in one run.

    python -m benchmarks.bench_stages [--batch 4] [--bank 20000] [--steps 2]

Geometries: CLIP RN50x4 at 288 px (CLIP4CIR / SPN4CIR) and CLIP ViT-B/32 at 224 px; modification texts of
24 tokens (a FashionIQ "c0 and c1" caption); a bank of 20,000 candidates. A step = forward, loss, backward
and an AdamW update. The stage-2 floor is the text tower's forward + backward plus the bank matmul, timed
alone; docs/benchmarks.md reports the ratio stage 2 / stage 1 (the paper: about 1/20) and stage 2 / floor.
"""

import argparse
import time

import torch

from modeling_spn4cir import CLIP4CIRConfig, CLIP4CIRModel
from trainers.losses import CandidateBankLoss, InBatchInfoNCELoss

GEOMETRIES = {
    "RN50x4 @288": dict(
        text_config=dict(vocab_size=49408, hidden_size=640, intermediate_size=2560, num_hidden_layers=12,
                         num_attention_heads=10, max_position_embeddings=77, projection_dim=640, eos_token_id=2),
        vision_config=dict(model_type="clip4cir_resnet", layers=[4, 6, 10, 6], width=80, image_size=288,
                           projection_dim=640),
        projection_dim=640,
    ),
    "ViT-B/32 @224": dict(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, projection_dim=512, eos_token_id=2),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32, projection_dim=512),
        projection_dim=512,
    ),
}


def _time(fn, steps):
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def bench(name, geometry, batch, bank_size, steps, stage2_batch, text_len=24):
    torch.manual_seed(0)
    model = CLIP4CIRModel(CLIP4CIRConfig(**geometry)).train()
    size, dim = model.config.image_size, model.config.projection_dim
    ids = torch.randint(1, 49000, (batch, text_len))
    ids[:, -1] = 49407
    mask = torch.ones_like(ids)
    pixels, targets = torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)

    in_batch = InBatchInfoNCELoss(0.02)
    optimizer1 = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def stage1():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, target_pixel_values=targets,
                    return_loss=False)
        in_batch(out.query_embeds, out.target_embeds).backward()
        optimizer1.step()
        optimizer1.zero_grad(set_to_none=True)

    t1 = _time(stage1, steps)

    with torch.no_grad():
        reference = model.get_reference_features(pixels)
    bank = torch.nn.functional.normalize(torch.randn(bank_size, dim), dim=-1)
    bank_loss = CandidateBankLoss(bank, 0.02)
    target_index = torch.randint(bank_size, (batch,))
    model.freeze_target_side()
    optimizer2 = torch.optim.AdamW(model.query_side_parameters(), lr=1e-6)

    def stage2():
        out = model(input_ids=ids, attention_mask=mask, reference_features=reference, return_loss=False)
        bank_loss(out.query_embeds, target_index).backward()
        optimizer2.step()
        optimizer2.zero_grad(set_to_none=True)

    def floor():
        text = model.get_text_features(ids, mask)
        (text @ bank.T).sum().backward()
        model.zero_grad(set_to_none=True)

    t2 = _time(stage2, steps * 3)
    t_floor = _time(floor, steps * 3)
    print(f"{name}: bank {bank_size}, {text_len}-token texts")
    print(f"  stage 1 step  (batch {batch:3d}): {1000 * t1 / batch:8.1f} ms / sample")
    print(f"  stage 2 step  (batch {batch:3d}): {1000 * t2 / batch:8.1f} ms / sample  = 1/{t1 / t2:.1f} of stage 1")
    print(f"  stage-2 floor (batch {batch:3d}): {1000 * t_floor / batch:8.1f} ms / sample  (step = {t2 / t_floor:.2f}x floor)")
    # Stage 2 runs at SPN's large batches; the AdamW update of the text tower is then shared by more samples.
    ids = ids.repeat(stage2_batch // batch, 1)
    mask, reference = torch.ones_like(ids), reference.repeat(stage2_batch // batch, 1)
    target_index = torch.randint(bank_size, (ids.shape[0],))
    t2b, t_floor_b = _time(stage2, steps), _time(floor, steps)
    n = ids.shape[0]
    print(f"  stage 2 step  (batch {n:3d}): {1000 * t2b / n:8.1f} ms / sample  = 1/{t1 / batch / (t2b / n):.1f} of stage 1")
    print(f"  stage-2 floor (batch {n:3d}): {1000 * t_floor_b / n:8.1f} ms / sample  (step = {t2b / t_floor_b:.2f}x floor)")
    return t1, t2, t_floor


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--bank", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--stage2_batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    for name, geometry in GEOMETRIES.items():
        bench(name, geometry, args.batch, args.bank, args.steps, args.stage2_batch)
