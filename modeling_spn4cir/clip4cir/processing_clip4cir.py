"""Processor pairing the CLIP4CIR image processor with a CLIP tokenizer."""

from transformers.processing_utils import ProcessorMixin

from .cir_contract import CIRProcessorMixin


class CLIP4CIRProcessor(CIRProcessorMixin, ProcessorMixin):
    r"""
    `processor(images=..., text=...)` -> `pixel_values` `[N, 3, S, S]` and/or `input_ids`, `attention_mask`
    `[B, L]` (padded to the longest, truncated to the tokenizer's context length).

    Args:
        image_processor ([`CLIP4CIRImageProcessor`]): image preprocessing.
        tokenizer (`CLIPTokenizer` or any tokenizer): text tokenization.
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)


__all__ = ["CLIP4CIRProcessor"]
