"""Contrastive losses of SPN's two stages, as `nn.Module`s acting on embeddings (sentence-transformers style).

The trainer runs the (possibly DDP-wrapped) model forward and hands the embeddings to these modules, so DDP's
gradient hooks see a normal forward; the maths lives here, not in the trainer.

- `in_batch`: stage 1, `InBatchInfoNCELoss` (and the fp32 scores every loss uses);
- `negative_types`: stage 1 with the negative types of SPN's study (`negative_type_loss`, `NegativeTypeLoss`);
- `bank`: stage 2, `CandidateBankLoss` (whole, sampled or in-batch negatives) and `ShardedCandidateBankLoss`;
- `stage1`: which stage-1 loss a model trains with (`stage1_loss_for`).
"""

from .bank import CandidateBankLoss, ShardedCandidateBankLoss, shard_bounds
from .in_batch import InBatchInfoNCELoss, Similarity
from .negative_types import (
    DEFAULT_NEGATIVE_TYPES,
    NEGATIVE_TYPES,
    NegativeTypeLoss,
    check_negative_types,
    negative_type_loss,
    negative_types_from_bits,
)
from .stage1 import negative_type_loss_for, stage1_loss_for

__all__ = ["DEFAULT_NEGATIVE_TYPES", "NEGATIVE_TYPES", "CandidateBankLoss", "InBatchInfoNCELoss", "NegativeTypeLoss",
           "ShardedCandidateBankLoss", "Similarity", "check_negative_types", "negative_type_loss",
           "negative_type_loss_for", "negative_types_from_bits", "shard_bounds", "stage1_loss_for"]
