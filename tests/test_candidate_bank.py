"""Candidate bank: built once with the frozen towers, reused only when its fingerprint matches."""

import logging

import datasets
import pytest
import torch
from conftest import solid_images, tiny_model

import trainers.candidate_bank as cb
from modeling_spn4cir import CLIP4CIRImageProcessor
from trainers.candidate_bank import bank_image_ids, load_or_build_candidate_bank
from trainers.data import ImageStore


def _corpus(images):
    ids = [f"c{i}" for i in range(len(images))]
    return datasets.Dataset.from_dict({"image_id": ids, "image": images},
                                      features=datasets.Features({"image_id": datasets.Value("string"), "image": datasets.Image()}))


@pytest.fixture
def parts():
    model = tiny_model("vit", "sum").eval()
    store = ImageStore(_corpus(solid_images(6)))
    return model, store, CLIP4CIRImageProcessor(size=32), [f"c{i}" for i in range(6)]


def _build(model, store, processor, ids, bank_dir, **kw):
    return load_or_build_candidate_bank(model, store, ids, processor, bank_dir=bank_dir, batch_size=4,
                                        show_progress_bar=False, **kw)


def test_bank_contents_and_reuse(parts, tmp_path, monkeypatch):
    model, store, processor, ids = parts
    bank = _build(model, store, processor, ids, tmp_path)
    with torch.no_grad():
        pixels = processor(store.images(ids))["pixel_values"]
        torch.testing.assert_close(bank.target_embeds, model.get_target_embeds(pixels))
        torch.testing.assert_close(bank.reference_features, model.get_reference_features(pixels))
    assert (tmp_path / "bank.safetensors").exists() and (tmp_path / "bank.json").exists()

    def no_encoding(*a, **k):
        raise AssertionError("a matching bank must be loaded, not rebuilt")

    monkeypatch.setattr(cb, "encode_images", no_encoding)
    again = _build(model, store, processor, ids, tmp_path)
    assert torch.equal(again.target_embeds, bank.target_embeds)
    # the query side is not part of the fingerprint: training it does not invalidate the bank
    with torch.no_grad():
        model.text_projection.weight.add_(1.0)
    _build(model, store, processor, ids, tmp_path)


def test_changed_tower_rebuilds(parts, tmp_path, caplog):
    model, store, processor, ids = parts
    first = _build(model, store, processor, ids, tmp_path)
    with torch.no_grad():
        model.visual_projection.weight.mul_(2.0)
    with caplog.at_level(logging.WARNING):
        second = _build(model, store, processor, ids, tmp_path)
    assert "frozen_tower_weights" in caplog.text
    assert not torch.allclose(first.reference_features, second.reference_features)


def test_changed_image_rebuilds(parts, tmp_path, caplog):
    model, store, processor, ids = parts
    first = _build(model, store, processor, ids, tmp_path)
    changed = solid_images(6)
    changed[2] = solid_images(1, seed=99)[0]
    with caplog.at_level(logging.WARNING):
        second = _build(model, ImageStore(_corpus(changed)), processor, ids, tmp_path)
    assert "image_content" in caplog.text
    assert not torch.equal(first.target_embeds[2], second.target_embeds[2])
    torch.testing.assert_close(first.target_embeds[0], second.target_embeds[0])


def test_processor_and_dtype_are_fingerprinted(parts, tmp_path, caplog):
    model, store, processor, ids = parts
    _build(model, store, processor, ids, tmp_path)
    with caplog.at_level(logging.WARNING):
        half = _build(model, store, processor, ids, tmp_path, dtype="float16")
        _build(model, store, CLIP4CIRImageProcessor(size=32, preprocessing="squarepad"), ids, tmp_path)
    assert half.target_embeds.dtype == torch.float16
    assert "dtype" in caplog.text and "image_processor" in caplog.text


def test_bank_ids_dedup_and_missing(parts):
    model, store, processor, _ = parts
    triplets = datasets.Dataset.from_dict({"reference_id": ["c0", "c3", "c1"], "target_id": ["c1", "c4", "c5"]})
    dedup = {"c5": "c0", "c4": "c3"}
    ids = bank_image_ids([triplets], dedup)
    assert ids == ["c0", "c3", "c1"]
    bank = _build(model, store, processor, ids, None, dedup_map=dedup)
    assert bank.indices(["c5", "c4", "c1"]) == [0, 1, 2]
    with pytest.raises(KeyError, match="c2"):
        bank.indices(["c2"])
    with pytest.raises(ValueError, match="not in the corpus"):
        _build(model, store, processor, ["c0", "zz"], None)
