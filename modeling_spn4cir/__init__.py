"""spn4cir model families, one folder each. Importing this package registers them with the transformers Auto
classes; saved directories carry their code (`auto_map`), so they also load with `trust_remote_code=True`
without this package."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor

from .blip4cir import BLIP4CIRConfig, BLIP4CIRModel, BLIP4CIROutput, BLIP4CIRPreTrainedModel, BLIP4CIRProcessor
from .cir_contract import CIRModelMixin, CIRModelOutput, dot_similarity, max_token_similarity
from .clip4cir import (
    CLIP4CIRConfig,
    CLIP4CIRImageProcessor,
    CLIP4CIRModel,
    CLIP4CIROutput,
    CLIP4CIRPreTrainedModel,
    CLIP4CIRProcessor,
    CLIP4CIRResNetConfig,
    Combiner,
)
from .pipeline_cir import ComposedImageRetrievalPipeline  # registers the "composed-image-retrieval" task
from .sprc import SPRCConfig, SPRCModel, SPRCOutput, SPRCPreTrainedModel, SPRCProcessor
from .tgcir import TGCIRConfig, TGCIRModel, TGCIROutput, TGCIRPreTrainedModel, TGCIRProcessor


def register_family(config_class, model_class, processor_class=None, image_processor_class=None, sub_configs=()):
    """Register one family with the Auto classes and for `trust_remote_code` saving."""
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    for sub_config in sub_configs:
        AutoConfig.register(sub_config.model_type, sub_config, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)
    config_class.register_for_auto_class()
    model_class.register_for_auto_class("AutoModel")
    if image_processor_class is not None:
        AutoImageProcessor.register(config_class, image_processor_classes={"pil": image_processor_class},
                                    exist_ok=True)
        image_processor_class.register_for_auto_class("AutoImageProcessor")
    if processor_class is not None:
        AutoProcessor.register(config_class, processor_class, exist_ok=True)
        processor_class.register_for_auto_class("AutoProcessor")


register_family(CLIP4CIRConfig, CLIP4CIRModel, CLIP4CIRProcessor, CLIP4CIRImageProcessor,
                sub_configs=(CLIP4CIRResNetConfig,))
# The other families preprocess images like CLIP4Cir (TargetPad / resize, their own mean, std and size).
register_family(TGCIRConfig, TGCIRModel, TGCIRProcessor, CLIP4CIRImageProcessor)
register_family(BLIP4CIRConfig, BLIP4CIRModel, BLIP4CIRProcessor, CLIP4CIRImageProcessor)
register_family(SPRCConfig, SPRCModel, SPRCProcessor, CLIP4CIRImageProcessor)

__all__ = [
    "CIRModelMixin",
    "CIRModelOutput",
    "dot_similarity",
    "max_token_similarity",
    "register_family",
    "ComposedImageRetrievalPipeline",
    "CLIP4CIRConfig",
    "CLIP4CIRResNetConfig",
    "CLIP4CIRModel",
    "CLIP4CIROutput",
    "CLIP4CIRPreTrainedModel",
    "CLIP4CIRImageProcessor",
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

