"""BLIP4CIR: BLIP ViT + BLIP's image-grounded text encoder (SPN4CIR's BLIP backbone, optional "+Bi")."""

import sys

from .. import cir_contract

# `cir_contract.py` here links to the shared module (so save_pretrained ships it); make it the same object.
sys.modules.setdefault(f"{__name__}.cir_contract", cir_contract)

from .configuration_blip4cir import BLIP4CIRConfig
from .modeling_blip4cir import BLIP4CIRModel, BLIP4CIROutput, BLIP4CIRPreTrainedModel
from .processing_blip4cir import BLIP4CIRProcessor, build_blip_tokenizer

__all__ = [
    "BLIP4CIRConfig",
    "BLIP4CIRModel",
    "BLIP4CIROutput",
    "BLIP4CIRPreTrainedModel",
    "BLIP4CIRProcessor",
    "build_blip_tokenizer",
]
