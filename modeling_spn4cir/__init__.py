"""spn4cir model families. Importing this package registers them with the transformers Auto classes."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor

from .configuration_clip4cir import CLIP4CIRConfig, CLIP4CIRResNetConfig
from .image_processing_clip4cir import CLIP4CIRImageProcessor
from .modeling_clip4cir import CLIP4CIRModel, CLIP4CIROutput, CLIP4CIRPreTrainedModel, Combiner
from .processing_clip4cir import CLIP4CIRProcessor

AutoConfig.register(CLIP4CIRConfig.model_type, CLIP4CIRConfig, exist_ok=True)
AutoConfig.register(CLIP4CIRResNetConfig.model_type, CLIP4CIRResNetConfig, exist_ok=True)
AutoModel.register(CLIP4CIRConfig, CLIP4CIRModel, exist_ok=True)
AutoImageProcessor.register(CLIP4CIRConfig, image_processor_classes={"pil": CLIP4CIRImageProcessor}, exist_ok=True)
AutoProcessor.register(CLIP4CIRConfig, CLIP4CIRProcessor, exist_ok=True)

# Saved directories carry the code (auto_map), so they load with trust_remote_code=True without this package.
CLIP4CIRConfig.register_for_auto_class()
CLIP4CIRModel.register_for_auto_class("AutoModel")
CLIP4CIRImageProcessor.register_for_auto_class("AutoImageProcessor")
CLIP4CIRProcessor.register_for_auto_class("AutoProcessor")

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
