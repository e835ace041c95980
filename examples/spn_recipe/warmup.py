"""Stage 0 of the synthetic recipe: image-caption contrastive warm-up of a model built from scratch.

A real SPN run starts from CLIP, whose towers were aligned on web image-text pairs; a model built from a
config has no such alignment. This short warm-up on captioned images plays that role. It is not part of SPN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .minibatch import train_minibatches


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
    tokens = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        image = model.get_target_embeds(pixel_values[idx])
        text = F.normalize(model.get_text_features(tokens["input_ids"][idx], tokens["attention_mask"][idx]), dim=-1)
        return loss_fn(image, text)

    return train_minibatches(model, len(captions), batch_size, epochs, learning_rate, seed, batch_loss,
                             "Stage 0: image-caption warm-up", show_progress_bar)
