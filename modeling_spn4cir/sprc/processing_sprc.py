"""Processor of the SPRC family: BLIP-2's BERT tokenizer (with `[DEC]`) and LAVIS' caption pre-processing, plus an
image processor with BLIP-2's resolution and normalization.

The image processor is the project's `CLIP4CIRImageProcessor` (TargetPad 1.25, bicubic resize, center crop, OpenAI
CLIP mean/std: exactly `blip24cir/data_utils.py:targetpad_transform`), configured at the ViT's resolution (224
for BLIP-2's ViT-g). It is loaded by class name through `AutoImageProcessor` (its own file travels with saved
checkpoints), so this file imports nothing from the other families.
"""

import re

from transformers.processing_utils import ProcessorMixin

from .cir_contract import CIRProcessorMixin


def pre_caption(caption: str, max_words: int = 50) -> str:
    """LAVIS `BlipCaptionProcessor.pre_caption`: lowercase, `.!"()*#:;~` -> space, collapse spaces, strip, keep the
    first `max_words` words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


class SPRCProcessor(CIRProcessorMixin, ProcessorMixin):
    r"""
    `processor(images=..., text=...)` -> `pixel_values` `[N, 3, S, S]` and/or `input_ids`, `attention_mask` `[B, L]`.

    Captions are pre-processed as LAVIS' `BlipCaptionProcessor` (`max_words`) and tokenized as the original
    (`padding="max_length"`, truncation, `max_length=max_txt_len`, i.e. 32 tokens).

    Args:
        image_processor: a `CLIP4CIRImageProcessor` at the model's resolution.
        tokenizer (`BertTokenizer`): `bert-base-uncased` with `[DEC]` added as `bos_token` (BLIP-2's tokenizer).
        max_txt_len (`int`, defaults to 32): padded / truncated text length.
        max_words (`int`, defaults to 50): caption pre-processing word limit.
    """

    def __init__(self, image_processor=None, tokenizer=None, max_txt_len: int = 32, max_words: int = 50, **kwargs):
        self.max_txt_len = int(max_txt_len)
        self.max_words = int(max_words)
        super().__init__(image_processor, tokenizer)

    def preprocess_text(self, text):
        """One caption or a list of them -> LAVIS-processed caption(s)."""
        if isinstance(text, str):
            return pre_caption(text, self.max_words)
        return [pre_caption(t, self.max_words) for t in text]

    text_defaults = {"padding": "max_length", "truncation": True}

    def encode_text(self, text, return_tensors, **kwargs):
        """The original's caption cleaning, then BERT tokens padded to `max_txt_len` (32)."""
        kwargs.setdefault("max_length", self.max_txt_len)
        return super().encode_text(self.preprocess_text(text), return_tensors, **kwargs)


__all__ = ["SPRCProcessor", "pre_caption"]
