"""Processor of the SPRC family: BLIP-2's BERT tokenizer (with `[DEC]`) and LAVIS' caption pre-processing, plus an
image processor with BLIP-2's resolution and normalization.

The image processor is the shared `CLIP4CIRImageProcessor` (`cir_contract.py`: TargetPad 1.25, bicubic resize, center
crop, OpenAI CLIP mean/std: exactly `blip24cir/data_utils.py:targetpad_transform`), configured at the ViT's
resolution (224 for BLIP-2's ViT-g).
"""

import re
from pathlib import Path

from transformers import BertTokenizer
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


def build_blip2_tokenizer(name_or_path: str):
    """BLIP-2's tokenizer: `BertTokenizer` (a Hub id / directory, or a `vocab.txt` file) + `[DEC]` as `bos_token`."""
    if Path(name_or_path).is_file():
        tokenizer = BertTokenizer(vocab=str(name_or_path), do_lower_case=True)
    else:
        tokenizer = BertTokenizer.from_pretrained(name_or_path)
    if tokenizer.bos_token != "[DEC]":
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


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


__all__ = ["SPRCProcessor", "build_blip2_tokenizer", "pre_caption"]
