"""The stage collator and the text rules: which text a triplet trains with, and errors that name the triplet."""

import pytest

from conftest import tiny_tokenizer
from trainers.data import CIRCollator


class _Bank:
    """The two bank methods the stage-2 collator reads."""

    reference_features = None

    def indices(self, image_ids):
        return list(range(len(image_ids)))


def _collator():
    return CIRCollator(tiny_tokenizer(["make it blue"]), "candidate_bank", bank=_Bank())


def test_a_triplet_without_text_is_named():
    rows = [{"reference_id": "a", "target_id": "b", "modification_texts": ["make it blue"], "row_index": 0},
            {"reference_id": "c", "target_id": "d", "modification_texts": [], "row_index": 7}]
    with pytest.raises(ValueError, match=r"triplet 7 \(reference 'c', target 'd'\) has no modification text"):
        _collator()(rows)


def test_a_training_triplet_without_target_is_named():
    rows = [{"reference_id": "a", "target_id": None, "modification_texts": ["make it blue"], "row_index": 3}]
    with pytest.raises(ValueError, match=r"triplet 3 \(reference 'a', target None\)"):
        _collator()(rows)

