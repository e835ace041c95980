"""Stage 0 of the synthetic recipe: image-caption contrastive warm-up of a model built from scratch.

A real SPN run starts from CLIP, whose towers were aligned on web image-text pairs; a model built from a
config has no such alignment. This short warm-up on captioned images plays that role. It is not part of SPN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


class ImageTextInfoNCELoss(nn.Module):
    """
    CLIP's symmetric image-text contrastive loss (Radford et al., 2021): image i should match caption i among
    the batch's captions and vice versa. Single process (no gather).

        loss = (CE(I . T^T / tau, diag) + CE(T . I^T / tau, diag)) / 2

    Inputs: `image_embeds`, `text_embeds` `[B, D]`, L2-normalized, row i of each describing pair i.
    """

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.temperature = temperature

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        logits = image_embeds @ text_embeds.T / self.temperature
        labels = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def image_text_warmup(model, pixel_values: torch.Tensor, captions: list[str], tokenizer, epochs: int = 5,
                      batch_size: int = 128, learning_rate: float = 1e-3, temperature: float = 0.05, seed: int = 0,
                      show_progress_bar: bool = True) -> list[float]:
    """Train both towers with `ImageTextInfoNCELoss` on (`pixel_values` `[N, 3, S, S]`, `captions`); returns
    the per-step losses. AdamW with a linear decay; seeded shuffling."""
    loss_fn = ImageTextInfoNCELoss(temperature)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    n = len(captions)
    steps = epochs * (n // batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / max(steps, 1)))
    tokens = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    with tqdm(total=steps, desc="Stage 0: image-caption warm-up", disable=not show_progress_bar) as bar:
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n - batch_size + 1, batch_size):
                idx = order[start:start + batch_size]
                image = model.get_target_embeds(pixel_values[idx])
                text = F.normalize(model.get_text_features(tokens["input_ids"][idx], tokens["attention_mask"][idx]), dim=-1)
                loss = loss_fn(image, text)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # a from-scratch contrastive run can collapse
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update()
    model.eval()
    return losses
