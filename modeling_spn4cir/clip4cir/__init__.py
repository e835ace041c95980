"""CLIP4CIR: CLIP dual encoder with sum fusion (SPN4CIR) or CLIP4Cir's Combiner."""

import sys

from .. import cir_contract

# `cir_contract.py` here links to the shared module (so save_pretrained ships it); make it the same object.
sys.modules.setdefault(f"{__name__}.cir_contract", cir_contract)

from .configuration_clip4cir import CLIP4CIRConfig, CLIP4CIRResNetConfig  # noqa: E402
from .image_processing_clip4cir import CLIP4CIRImageProcessor  # noqa: E402
from .modeling_clip4cir import CLIP4CIRModel, CLIP4CIROutput, CLIP4CIRPreTrainedModel, Combiner  # noqa: E402
from .processing_clip4cir import CLIP4CIRProcessor  # noqa: E402

__all__ = [
    "CLIP4CIRConfig",
    "CLIP4CIRResNetConfig",
    "CLIP4CIRModel",
    "CLIP4CIROutput",
    "CLIP4CIRPreTrainedModel",
    "CLIP4CIRImageProcessor",
    "CLIP4CIRProcessor",
    "Combiner",
]
