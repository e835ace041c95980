"""Processor of the TG-CIR family: the project's CLIP4CIR image processor (CLIP's resize + center crop
preprocessing, as SPN4CIR's TG-CIR uses `clip.load`'s transform) and a CLIP tokenizer.

The image processor class is referenced by name only (registered for the TG-CIR config by the package and saved
with its own `auto_map`), so this file imports nothing from other families.
"""

from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin


class TGCIRProcessor(ProcessorMixin):
    r"""
    `processor(images=..., text=...)` -> `pixel_values` `[N, 3, S, S]` and/or `input_ids` `[B, L]`.

    Texts are padded to the tokenizer's `model_max_length` (77 for CLIP), as the original `clip.tokenize`:
    TG-CIR's text tower runs without a padding mask, so the padding length is part of the input.

    Args:
        image_processor (`CLIP4CIRImageProcessor`): image preprocessing.
        tokenizer (`CLIPTokenizer` or any tokenizer): text tokenization.
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)

    def __call__(self, images=None, text=None, return_tensors: str = "pt", **kwargs):
        if images is None and text is None:
            raise ValueError("Pass `images`, `text` or both.")
        data = {}
        if text is not None:
            kwargs.setdefault("padding", "max_length")
            kwargs.setdefault("truncation", True)
            data.update(self.tokenizer(text, return_tensors=return_tensors, **kwargs))
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors))
        return BatchFeature(data=data, tensor_type=return_tensors)


__all__ = ["TGCIRProcessor"]
