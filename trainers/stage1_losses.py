"""Which stage-1 objective a model family trains with (`config.stage1_loss`): plain in-batch InfoNCE unless the
family brings its own (TG-CIR's six terms, SPRC's itc + rtc + align, Bi-BLIP4CIR's forward + reverse)."""

from __future__ import annotations

from torch import nn

from .losses import InBatchInfoNCELoss, Similarity
from .losses_blip4cir import BLIP4CIRBidirectionalLoss
from .losses_sprc import SPRCStage1Loss
from .losses_tgcir import TGCIRStage1Loss

STAGE1_LOSSES: dict[str, type[nn.Module]] = {
    "in_batch_infonce": InBatchInfoNCELoss,
    "tgcir": TGCIRStage1Loss,
    "sprc": SPRCStage1Loss,
    "blip4cir_bidirectional": BLIP4CIRBidirectionalLoss,
}


def stage1_loss_for(model, temperature, similarity: Similarity | None = None) -> nn.Module:
    """The stage-1 loss module for `model` (its config's `stage1_loss`, default `"in_batch_infonce"`).

    Plain InfoNCE uses `temperature` (the trainer's tau) and the model's `similarity`; a family objective is built
    from the model's config (`from_config`), since it carries its own scales (TG-CIR's `loss_T`, SPRC's `temp`)."""
    name = getattr(model.config, "stage1_loss", None) or "in_batch_infonce"
    if name not in STAGE1_LOSSES:
        raise ValueError(f"{type(model).__name__} asks for stage-1 loss {name!r}; known: {sorted(STAGE1_LOSSES)}.")
    cls = STAGE1_LOSSES[name]
    if cls is InBatchInfoNCELoss:
        return cls(temperature, similarity)
    return cls.from_config(model.config, temperature)


__all__ = ["STAGE1_LOSSES", "stage1_loss_for"]
