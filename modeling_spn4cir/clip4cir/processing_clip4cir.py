"""Processor pairing the CLIP4CIR image processor with a CLIP tokenizer."""

from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin


class CLIP4CIRProcessor(ProcessorMixin):
    r"""
    `processor(images=..., text=...)` -> `pixel_values` `[N, 3, S, S]` and/or `input_ids`, `attention_mask`
    `[B, L]` (padded to the longest, truncated to the tokenizer's context length).

    Args:
        image_processor ([`CLIP4CIRImageProcessor`]): image preprocessing.
        tokenizer (`CLIPTokenizer` or any tokenizer): text tokenization.
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)

    def __call__(self, images=None, text=None, return_tensors: str = "pt", **kwargs):
        if images is None and text is None:
            raise ValueError("Pass `images`, `text` or both.")
        data = {}
        if text is not None:
            kwargs.setdefault("padding", True)
            kwargs.setdefault("truncation", True)
            data.update(self.tokenizer(text, return_tensors=return_tensors, **kwargs))
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors))
        return BatchFeature(data=data, tensor_type=return_tensors)


__all__ = ["CLIP4CIRProcessor"]
