"""Train a small word-level tokenizer (with `tokenizers`) on a corpus of texts, as a transformers tokenizer.

For models trained from scratch on a closed vocabulary (the synthetic benchmark): every row becomes
`<sot> words <eot>`, padded with `<pad>`; unknown words map to `<unk>`.
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKENS = ("<pad>", "<unk>", "<sot>", "<eot>")


def train_word_tokenizer(texts: Iterable[str], model_max_length: int = 32):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS)))
    sot, eot = tok.token_to_id("<sot>"), tok.token_to_id("<eot>")
    tok.post_processor = processors.TemplateProcessing(single="<sot> $A <eot>",
                                                       special_tokens=[("<sot>", sot), ("<eot>", eot)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<sot>",
                                   eos_token="<eot>", model_max_length=model_max_length)
