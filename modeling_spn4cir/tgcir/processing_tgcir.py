"""Processor of the TG-CIR family: the shared `CLIP4CIRImageProcessor` (`cir_contract.py`) with CLIP's resize + center
crop preprocessing (SPN4CIR's TG-CIR uses `clip.load`'s transform), and a CLIP tokenizer.
"""

from transformers.processing_utils import ProcessorMixin

from .cir_contract import CIRProcessorMixin


class TGCIRProcessor(CIRProcessorMixin, ProcessorMixin):
    r"""
    `processor(images=..., text=...)` -> `pixel_values` `[N, 3, S, S]` and/or `input_ids` `[B, L]`.

    Texts are padded to the tokenizer's `model_max_length` (77 for CLIP), as the original `clip.tokenize`:
    TG-CIR's text tower runs without a padding mask, so the padding length is part of the input.

    Args:
        image_processor (`CLIP4CIRImageProcessor`): image preprocessing.
        tokenizer (`CLIPTokenizer` or any tokenizer): text tokenization.
    """

    # The text tower averages over padding (no attention mask): pad to the context length, as the original.
    text_defaults = {"padding": "max_length", "truncation": True}

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)


__all__ = ["TGCIRProcessor"]
