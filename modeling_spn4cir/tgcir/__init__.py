"""TG-CIR: CLIP ViT towers with token learners, global masks and the remain-map fusion (Wen et al., MM 2023)."""

import sys

from .. import cir_contract

# `cir_contract.py` here links to the shared module (so save_pretrained ships it); make it the same object.
sys.modules.setdefault(f"{__name__}.cir_contract", cir_contract)

from .configuration_tgcir import TGCIRConfig
from .modeling_tgcir import (
    TGCIRModel,
    TGCIROutput,
    TGCIRPreTrainedModel,
    TGCIRTokenLearner,
)
from .processing_tgcir import TGCIRProcessor

__all__ = ["TGCIRConfig", "TGCIRModel", "TGCIROutput", "TGCIRPreTrainedModel", "TGCIRProcessor", "TGCIRTokenLearner"]
