"""Candidate bank: built once with the frozen towers, reused only when its fingerprint matches; stored as
memory-mapped shards whose build resumes after a kill."""

import logging
import pickle

import datasets
import pytest
import torch
from conftest import solid_images, tiny_model
from multivector_family import MultiVectorConfig, MultiVectorModel
from safetensors.torch import load_file

import trainers.candidate_bank as cb
from modeling_spn4cir import CLIP4CIRImageProcessor
from trainers.candidate_bank import (
    ShardedRows,
    bank_image_ids,
    load_or_build_candidate_bank,
)
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
        torch.testing.assert_close(bank.reference_features.to_tensor(), model.get_reference_features(pixels))
    # 6 images, default shard size: one shard, its manifest, and bank.json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank-00000.json", "bank-00000.safetensors", "bank.json"]

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
    assert not torch.allclose(first.reference_features.to_tensor(), second.reference_features.to_tensor())


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


# --- sharded, memory-mapped, resumable storage (token-level reference features [N, T, H]) ---

N_TOKENS = 10  # images; shard_size 3 -> shards of 3, 3, 3 and 1 rows


@pytest.fixture
def token_parts():
    torch.manual_seed(0)
    model = MultiVectorModel(MultiVectorConfig()).eval()  # reference features [N, 16, 16], targets [N, 3, 8]
    store = ImageStore(_corpus(solid_images(N_TOKENS)))
    return model, store, CLIP4CIRImageProcessor(size=32), [f"c{i}" for i in range(N_TOKENS)]


class _CountingEncoder:
    """Wraps `encode_images`: records the ids of every call; raises on call number `fail_on` (1-based)."""

    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def __call__(self, encode, images, image_ids, *args, **kwargs):
        self.calls.append(list(image_ids))
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise KeyboardInterrupt("killed")
        return _ORIGINAL_ENCODE(encode, images, image_ids, *args, **kwargs)


_ORIGINAL_ENCODE = cb.encode_images


def _counting(monkeypatch, fail_on=None):
    counter = _CountingEncoder(fail_on)
    monkeypatch.setattr(cb, "encode_images", counter)
    return counter


def _shard_files(bank_dir):
    return sorted(p.name for p in bank_dir.iterdir())


def _assert_same_bank(a, b):
    assert a.image_ids == b.image_ids
    assert torch.equal(a.target_embeds, b.target_embeds)
    assert torch.equal(a.reference_features.to_tensor(), b.reference_features.to_tensor())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sharded_view_returns_the_rows_of_an_in_memory_build(token_parts, tmp_path, dtype):
    model, store, processor, ids = token_parts
    memory = _build(model, store, processor, ids, None, dtype=dtype)
    bank = _build(model, store, processor, ids, tmp_path, dtype=dtype, shard_size=3)
    view = bank.reference_features
    assert isinstance(view, ShardedRows) and isinstance(memory.reference_features, torch.Tensor)
    assert _shard_files(tmp_path) == [f"bank-0000{k}.{ext}" for k in range(4) for ext in ("json", "safetensors")] + ["bank.json"]
    assert view.shape == memory.reference_features.shape == (N_TOKENS, 16, 16) and len(view) == N_TOKENS
    assert view.dtype == memory.reference_features.dtype == cb.DTYPES[dtype]
    # the shards hold what the towers give (encoded shard by shard: equal up to batching round-off)
    stored = torch.cat([load_file(tmp_path / f"bank-0000{k}.safetensors")["reference_features"] for k in range(4)])
    torch.testing.assert_close(stored, memory.reference_features)
    torch.testing.assert_close(bank.target_embeds, memory.target_embeds)
    assert bank.target_embeds.shape == (N_TOKENS, 3, 8) and bank.target_embeds.dtype == cb.DTYPES[dtype]
    # any row order, repeats, rows of every shard, several index types: exactly the stored rows, in that order
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, N_TOKENS, (40,), generator=g).tolist() + [9, 0, 9, 3, 2, 3]
    assert torch.equal(view[rows], stored[rows])
    assert torch.equal(view[torch.tensor(rows)], stored[rows])
    with pytest.raises(TypeError):  # a tuple indexes several dimensions (torch semantics): not supported
        view[8, 1]
    assert torch.equal(view[7], stored[7]) and torch.equal(view[-1], stored[-1])
    assert torch.equal(view[2:8:2], stored[2:8:2]) and torch.equal(view.to_tensor(), stored)
    assert view[[]].shape == (0, 16, 16)
    with pytest.raises(IndexError):
        view[[N_TOKENS]]
    # the collator's expression, and a view pickled into a DataLoader worker
    assert torch.equal(bank.reference_features[bank.indices(["c9", "c0", "c9"])], stored[[9, 0, 9]])
    assert torch.equal(pickle.loads(pickle.dumps(view))[rows], stored[rows])
    # a warm start maps the same shards
    again = _build(model, store, processor, ids, tmp_path, dtype=dtype, shard_size=3)
    _assert_same_bank(again, bank)


def test_killed_build_resumes_encoding_only_the_missing_shards(token_parts, tmp_path, monkeypatch):
    model, store, processor, ids = token_parts
    whole = _build(model, store, processor, ids, tmp_path / "whole", shard_size=3)

    # killed while encoding the third shard: two complete shards, no bank.json
    killer = _counting(monkeypatch, fail_on=3)
    with pytest.raises(KeyboardInterrupt):
        _build(model, store, processor, ids, tmp_path / "bank", shard_size=3)
    assert killer.calls == [ids[0:3], ids[3:6], ids[6:9]]
    assert _shard_files(tmp_path / "bank") == ["bank-00000.json", "bank-00000.safetensors",
                                               "bank-00001.json", "bank-00001.safetensors"]
    counter = _counting(monkeypatch)
    resumed = _build(model, store, processor, ids, tmp_path / "bank", shard_size=3)
    assert counter.calls == [ids[6:9], ids[9:10]]
    _assert_same_bank(resumed, whole)

    # a lost bank.json and a lost middle shard: only that shard is encoded again
    (tmp_path / "bank" / "bank.json").unlink()
    (tmp_path / "bank" / "bank-00001.safetensors").unlink()
    counter = _counting(monkeypatch)
    resumed = _build(model, store, processor, ids, tmp_path / "bank", shard_size=3)
    assert counter.calls == [ids[3:6]]
    _assert_same_bank(resumed, whole)

    # a shard written but killed before its manifest: that shard is encoded again, the others are not
    (tmp_path / "bank" / "bank.json").unlink()
    (tmp_path / "bank" / "bank-00002.json").unlink()
    counter = _counting(monkeypatch)
    _assert_same_bank(_build(model, store, processor, ids, tmp_path / "bank", shard_size=3), whole)
    assert counter.calls == [ids[6:9]]

    # complete and matching: nothing is encoded
    counter = _counting(monkeypatch)
    _assert_same_bank(_build(model, store, processor, ids, tmp_path / "bank", shard_size=3), whole)
    assert counter.calls == []


def test_changed_image_reencodes_only_its_shard(token_parts, tmp_path, monkeypatch, caplog):
    model, store, processor, ids = token_parts
    first = _build(model, store, processor, ids, tmp_path, shard_size=3)
    changed = solid_images(N_TOKENS)
    changed[4] = solid_images(1, seed=99)[0]
    counter = _counting(monkeypatch)
    with caplog.at_level(logging.WARNING):
        second = _build(model, ImageStore(_corpus(changed)), processor, ids, tmp_path, shard_size=3)
    assert "image_content" in caplog.text
    assert counter.calls == [ids[3:6]]
    assert not torch.equal(first.target_embeds[4], second.target_embeds[4])
    keep = [i for i in range(N_TOKENS) if i not in (3, 4, 5)]
    assert torch.equal(first.target_embeds[keep], second.target_embeds[keep])
    fresh = _build(model, ImageStore(_corpus(changed)), processor, ids, tmp_path / "fresh", shard_size=3)
    _assert_same_bank(second, fresh)


def test_changed_shard_size_or_dtype_rebuilds_and_removes_stale_shards(token_parts, tmp_path, monkeypatch, caplog):
    model, store, processor, ids = token_parts
    _build(model, store, processor, ids, tmp_path, shard_size=3)
    (tmp_path / ".bank-00003.safetensors.tmp123").write_bytes(b"left by a killed write")
    (tmp_path / "bank.safetensors").write_bytes(b"the single-file format of an older version")
    (tmp_path / "notes.txt").write_text("not the bank's")
    counter = _counting(monkeypatch)
    with caplog.at_level(logging.WARNING):
        bank = _build(model, store, processor, ids, tmp_path, shard_size=4)
    assert "shard_size" in caplog.text
    assert counter.calls == [ids[0:4], ids[4:8], ids[8:10]]
    assert _shard_files(tmp_path) == ["bank-00000.json", "bank-00000.safetensors", "bank-00001.json",
                                      "bank-00001.safetensors", "bank-00002.json", "bank-00002.safetensors",
                                      "bank.json", "notes.txt"]
    _assert_same_bank(bank, _build(model, store, processor, ids, tmp_path / "fresh", shard_size=4))

    caplog.clear()
    counter = _counting(monkeypatch)
    with caplog.at_level(logging.WARNING):
        half = _build(model, store, processor, ids, tmp_path, shard_size=4, dtype="float16")
    assert ": dtype changed since it was built" in caplog.text
    assert len(counter.calls) == 3
    assert half.reference_features.dtype == half.target_embeds.dtype == torch.float16
    assert half.reference_features[[1, 9]].dtype == torch.float16
    torch.testing.assert_close(half.reference_features.to_tensor().float(), bank.reference_features.to_tensor(),
                               atol=1e-2, rtol=1e-2)


def test_truncated_or_corrupt_shard_is_named_and_reencoded(token_parts, tmp_path, monkeypatch, caplog):
    model, store, processor, ids = token_parts
    whole = _build(model, store, processor, ids, tmp_path / "whole", shard_size=3)
    bank_dir = tmp_path / "bank"
    _build(model, store, processor, ids, bank_dir, shard_size=3)

    # truncated behind a complete bank.json: the warm start's size and header checks catch it
    shard = bank_dir / "bank-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    counter = _counting(monkeypatch)
    with caplog.at_level(logging.WARNING):
        bank = _build(model, store, processor, ids, bank_dir, shard_size=3)
    assert "bank-00001.safetensors" in caplog.text and "truncated" in caplog.text
    assert counter.calls == [ids[3:6]]
    _assert_same_bank(bank, whole)

    # a garbled header behind a complete bank.json
    shard = bank_dir / "bank-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(b"\xff" * 16 + data[16:])
    caplog.clear()
    counter = _counting(monkeypatch)
    with caplog.at_level(logging.WARNING):
        bank = _build(model, store, processor, ids, bank_dir, shard_size=3)
    assert "bank-00003.safetensors" in caplog.text and "cannot be read" in caplog.text
    assert counter.calls == [ids[9:10]]
    _assert_same_bank(bank, whole)

    # flipped data bytes (same size, valid header) found when a killed build resumes: the sha256 check
    shard = bank_dir / "bank-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-8:] = bytes(255 - b for b in data[-8:])
    shard.write_bytes(bytes(data))
    (bank_dir / "bank.json").unlink()
    caplog.clear()
    counter = _counting(monkeypatch)
    with caplog.at_level(logging.WARNING):
        bank = _build(model, store, processor, ids, bank_dir, shard_size=3)
    assert "bank-00002.safetensors" in caplog.text and "sha256" in caplog.text
    assert counter.calls == [ids[6:9]]
    _assert_same_bank(bank, whole)


def test_unreadable_shard_error_names_the_file(tmp_path):
    bad = tmp_path / "bank-00000.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(RuntimeError, match="bank-00000.safetensors"):
        ShardedRows([bad], [2], "reference_features", (4,), torch.float32)
