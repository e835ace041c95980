"""spn4cir model families, one folder each. Importing this package registers them (one line per family, below)
with the family registry (`families`) and the transformers Auto classes; saved directories carry their code
(`auto_map`), so they also load with `trust_remote_code=True` without this package."""

from . import blip4cir, clip4cir, sprc, tgcir
from .blip4cir import BLIP4CIRConfig, BLIP4CIRModel, BLIP4CIROutput, BLIP4CIRPreTrainedModel, BLIP4CIRProcessor
from .cir_contract import (
    CIRModelMixin,
    CIRModelOutput,
    CLIP4CIRImageProcessor,
    dot_similarity,
    is_cir_model,
    max_token_similarity,
)
from .clip4cir import (
    CLIP4CIRConfig,
    CLIP4CIRModel,
    CLIP4CIROutput,
    CLIP4CIRPreTrainedModel,
    CLIP4CIRProcessor,
    CLIP4CIRResNetConfig,
    Combiner,
)
from .families import FamilySpec, register_family
from .retrieval import ComposedImageRetrievalPipeline  # registers the "composed-image-retrieval" task
from .sprc import SPRCConfig, SPRCModel, SPRCOutput, SPRCPreTrainedModel, SPRCProcessor
from .tgcir import TGCIRConfig, TGCIRModel, TGCIROutput, TGCIRPreTrainedModel, TGCIRProcessor

register_family(clip4cir.SPEC)
register_family(tgcir.SPEC)
register_family(blip4cir.SPEC)
register_family(sprc.SPEC)

__all__ = [
    "CIRModelMixin",
    "CIRModelOutput",
    "CLIP4CIRImageProcessor",
    "FamilySpec",
    "dot_similarity",
    "is_cir_model",
    "max_token_similarity",
    "register_family",
    "ComposedImageRetrievalPipeline",
    "CLIP4CIRConfig",
    "CLIP4CIRResNetConfig",
    "CLIP4CIRModel",
    "CLIP4CIROutput",
    "CLIP4CIRPreTrainedModel",
    "CLIP4CIRProcessor",
    "Combiner",
    "TGCIRConfig",
    "TGCIRModel",
    "TGCIROutput",
    "TGCIRPreTrainedModel",
    "TGCIRProcessor",
    "BLIP4CIRConfig",
    "BLIP4CIRModel",
    "BLIP4CIROutput",
    "BLIP4CIRPreTrainedModel",
    "BLIP4CIRProcessor",
    "SPRCConfig",
    "SPRCModel",
    "SPRCOutput",
    "SPRCPreTrainedModel",
    "SPRCProcessor",
]
