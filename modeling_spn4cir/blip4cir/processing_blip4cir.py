"""Processor of BLIP4CIR: BLIP's BERT tokenizer (with `[DEC]` and `[ENC]`) and an image processor.

The image processor is the shared `CLIP4CIRImageProcessor` (`cir_contract.py`) configured with BLIP4CIR's
preprocessing (TargetPad 1.25, bicubic resize, center crop to 384, CLIP mean/std, as SPN4CIR's
`blip4cir/data_utils.py`).
"""

from transformers import BertTokenizer
from transformers.processing_utils import ProcessorMixin

from .cir_contract import CIRProcessorMixin

DEC_TOKEN = "[DEC]"
ENC_TOKEN = "[ENC]"


def add_blip_special_tokens(tokenizer):
    """BLIP's `init_tokenizer` (blip.py): `[DEC]` as the bos token, then `[ENC]` as an additional special token,
    appended to the BERT vocabulary in that order. Idempotent; returns the tokenizer."""
    vocab = tokenizer.get_vocab()
    if DEC_TOKEN not in vocab:
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    if ENC_TOKEN not in vocab:
        tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    return tokenizer


def build_blip_tokenizer(name_or_path: str = "bert-base-uncased", **kwargs):
    """A BERT tokenizer (a Hub id, a directory, or a `vocab.txt` file) with BLIP's `[DEC]` and `[ENC]` added
    (for `bert-base-uncased`: ids 30522 and 30523, vocabulary 30524)."""
    if str(name_or_path).endswith(".txt"):
        tokenizer = BertTokenizer(vocab=str(name_or_path), do_lower_case=kwargs.pop("do_lower_case", True), **kwargs)
    else:
        tokenizer = BertTokenizer.from_pretrained(name_or_path, **kwargs)
    return add_blip_special_tokens(tokenizer)


class BLIP4CIRProcessor(CIRProcessorMixin, ProcessorMixin):
    r"""
    `processor(images=..., text=...)` -> `pixel_values` `[N, 3, S, S]` and/or `input_ids`, `attention_mask`
    `[B, L]`: tokenized with padding to the longest caption (truncated at the text encoder's positions, the
    tokenizer's `model_max_length`), then `[ENC]` written at position 0 in place of
    `[CLS]` (BLIP's image-grounded encoding, blip_cir.py); the attention mask is unchanged.

    Args:
        image_processor ([`CLIP4CIRImageProcessor`]): image preprocessing (size 384, TargetPad 1.25, CLIP mean/std).
        tokenizer (`BertTokenizer`): BERT tokenizer with BLIP's `[DEC]` / `[ENC]` (see [`build_blip_tokenizer`]).
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        if tokenizer is not None:
            add_blip_special_tokens(tokenizer)
        super().__init__(image_processor, tokenizer)

    @property
    def enc_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(ENC_TOKEN)

    # Padded to the longest, as the original; truncated at the tokenizer's `model_max_length`, which the family's
    # processor sets to the text encoder's position count (`FamilySpec.prepare_tokenizer`): the original has no
    # truncation and stops with a shape error on a longer text, so the two agree on every text it can encode.
    text_defaults = {"padding": "longest", "truncation": True}

    def encode_text(self, text, return_tensors, **kwargs):
        """Tokenize, then put `[ENC]` in place of `[CLS]` at position 0 (the mask is unchanged)."""
        encoded = super().encode_text(text, return_tensors, **kwargs)
        input_ids = encoded["input_ids"]
        if return_tensors == "pt":
            input_ids = input_ids.clone()
            input_ids[:, 0] = self.enc_token_id
        else:
            input_ids = [[self.enc_token_id, *row[1:]] for row in input_ids]
        encoded["input_ids"] = input_ids
        return encoded


__all__ = ["BLIP4CIRProcessor", "add_blip_special_tokens", "build_blip_tokenizer"]
