"""SPRC: BLIP-2's Q-Former for composed image retrieval (SPN4CIR's `blip24cir/`)."""

import sys

from .. import cir_contract

# `cir_contract.py` here links to the shared module (so save_pretrained ships it); make it the same object.
sys.modules.setdefault(f"{__name__}.cir_contract", cir_contract)

from .configuration_sprc import SPRCConfig
from .modeling_sprc import SPRCModel, SPRCOutput, SPRCPreTrainedModel, SPRCQueryEncoder
from .processing_sprc import SPRCProcessor, pre_caption

__all__ = [
           "SPRCConfig",
           "SPRCModel",
           "SPRCOutput",
           "SPRCPreTrainedModel",
           "SPRCProcessor",
           "SPRCQueryEncoder",
           "pre_caption",
]
