"""The training texts tokenized once (`trainers.text_tokens.TokenizedTexts`): every batch equals tokenizing its rows'
texts together, for each family's text handling, with the collator's random draws in every epoch."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_tokenizer

from modeling_spn4cir import CLIP4CIRImageProcessor
from trainers.data import CIRCollator, triplet_text_mode
from trainers.text import compose_text, tokenize
from trainers.text_tokens import TokenizedTexts, row_random

FIXTURES = Path(__file__).parent / "fixtures"
WORDS = ["make it blue", "red circle and a much longer text about the square", "and more", "is green.",
         "has no sleeves?", "the square should be green instead"]
ROWS = [  # FashionIQ-style pairs (joined at random), generated alternatives, single captions of several lengths
    {"modification_texts": ["make it blue", "has no sleeves?"], "source": "annotated"},
    {"modification_texts": ["red circle and a much longer text about the square"], "source": "annotated"},
    {"modification_texts": ["and more", "is green.", "make it blue"], "source": "generated"},
    {"modification_texts": ["the square should be green instead", "is green."], "source": "annotated"},
    {"modification_texts": ["is green."], "source": "generated"},
    {"modification_texts": ["red circle and a much longer text about the square", "and more"], "source": "annotated"},
]


def _processors():
    from modeling_spn4cir.blip4cir.processing_blip4cir import (
        BLIP4CIRProcessor,
        build_blip_tokenizer,
    )
    from modeling_spn4cir.clip4cir.processing_clip4cir import CLIP4CIRProcessor
    from modeling_spn4cir.sprc.processing_sprc import (
        SPRCProcessor,
        build_blip2_tokenizer,
    )
    from modeling_spn4cir.tgcir.processing_tgcir import TGCIRProcessor

    images = CLIP4CIRImageProcessor(size=32)
    left = tiny_tokenizer(WORDS)
    left.padding_side = "left"
    return {
        "bare tokenizer": tiny_tokenizer(WORDS),
        "bare tokenizer, left padding": left,
        "clip4cir": CLIP4CIRProcessor(image_processor=images, tokenizer=tiny_tokenizer(WORDS)),
        "tgcir (padded to the context)": TGCIRProcessor(image_processor=images, tokenizer=tiny_tokenizer(WORDS)),
        "blip4cir ([ENC] first)": BLIP4CIRProcessor(
            image_processor=images, tokenizer=build_blip_tokenizer(str(FIXTURES / "parity_blip4cir" / "vocab.txt"))),
        "sprc (cleaned, 32 tokens)": SPRCProcessor(
            image_processor=images, tokenizer=build_blip2_tokenizer(str(FIXTURES / "parity_sprc" / "vocab.txt"))),
    }


PROCESSORS = _processors()


def _texts(processor, join=True, max_length=None, seed=3):
    modes = [triplet_text_mode(r, join) for r in ROWS]
    return TokenizedTexts([r["modification_texts"] for r in ROWS], modes, processor, max_length, seed)


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_a_batch_equals_tokenizing_its_drawn_texts_together(name):
    processor = PROCESSORS[name]
    texts = _texts(processor)
    for epoch in range(3):
        for rows in ([0, 1, 2, 3, 4, 5], [5, 2], [4], [3, 0, 1]):
            drawn = [compose_text(ROWS[i]["modification_texts"], triplet_text_mode(ROWS[i], True), True,
                                  row_random(3, epoch, i)) for i in rows]
            expected = tokenize(processor, drawn)
            got = texts.batch(rows, epoch)
            assert torch.equal(got["input_ids"], expected["input_ids"]), (name, epoch, rows)
            assert torch.equal(got["attention_mask"], expected["attention_mask"]), (name, epoch, rows)
        lengths = texts.row_lengths(epoch)
        assert lengths.tolist() == [texts.batch([i], epoch)["input_ids"].shape[1] for i in range(len(ROWS))]


def test_truncation_and_the_draws_change_with_the_epoch():
    processor = PROCESSORS["clip4cir"]
    assert _texts(processor, max_length=5).row_lengths(0).max() == 5
    texts = _texts(processor)
    drawn = {tuple(texts.batch([0], epoch)["input_ids"][0].tolist()) for epoch in range(40)}
    assert len(drawn) == 4  # FashionIQ's four joins of one pair, drawn anew each epoch


def test_the_collator_with_tokenized_texts_gives_the_tokenizing_collators_batches():
    """The trainer's path (texts tokenized once) and the per-batch tokenizer path give identical batches."""

    class Bank:
        reference_features = torch.arange(8.0)[:, None]

        def indices(self, ids):
            return [int(i[3:]) for i in ids]

    rows = [dict(r, reference_id=f"img{i}", target_id=f"img{7 - i}", row_index=i) for i, r in enumerate(ROWS)]
    processor = PROCESSORS["clip4cir"]
    once = CIRCollator(processor, "candidate_bank", bank=Bank(), join_annotated_captions=True, seed=3,
                       texts=_texts(processor))
    each = CIRCollator(processor, "candidate_bank", bank=Bank(), join_annotated_captions=True, seed=3)
    for epoch in range(3):
        once.epoch = each.epoch = epoch
        a, b = once(rows[1:5]), each(rows[1:5])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="seed 3, the collator with 4"):
        CIRCollator(processor, "candidate_bank", bank=Bank(), seed=4, texts=_texts(processor))


def test_a_row_without_text_is_named_when_the_texts_are_tokenized():
    with pytest.raises(ValueError, match=r"triplet 1 .*has no modification text"):
        TokenizedTexts([["a"], []], ["choice", "choice"], PROCESSORS["clip4cir"])
