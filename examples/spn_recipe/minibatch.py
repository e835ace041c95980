"""The plain training loop of the recipe's two from-scratch models outside CIRTrainer: the stage-0 warm-up
(`warmup.py`) and the generative captioner (`generative_captioner.py`). They differ only in the loss of a batch."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm


def train_minibatches(model, n: int, batch_size: int, epochs: int, learning_rate: float, seed: int,
                      batch_loss: Callable[[torch.Tensor], torch.Tensor], desc: str,
                      show_progress_bar: bool = True) -> list[float]:
    """`epochs` passes over `n` examples in seeded random order, in full batches of `batch_size` (the remainder of
    each epoch is dropped); `batch_loss(indices [B])` gives a batch's loss. AdamW (weight decay 0.01) with a linear
    decay to 0, gradient norm clipped at 1 (a from-scratch run can collapse). Returns the per-step losses; the model
    is left in eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    steps = epochs * (n // batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / max(steps, 1)))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    with tqdm(total=steps, desc=desc, disable=not show_progress_bar) as bar:
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n - batch_size + 1, batch_size):
                loss = batch_loss(order[start:start + batch_size])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update()
    model.eval()
    return losses
