"""The toy family's config: a bag of text embeddings plus a patch encoder (see `modeling_toy`)."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class ToyCIRConfig(PreTrainedConfig):
    model_type = "toy_cir"

    vocab_size: int = 32
    hidden_size: int = 16
    image_size: int = 32
    patch_size: int = 8
    temperature: float = 0.1
    stage1_loss: str = "toy_symmetric"
