"""The candidate bank of stage 2: built once with the frozen towers, reused only when its fingerprint matches;
stored as memory-mapped shards whose build resumes after a kill; a warm start that reads no image byte; a foreign
or broken bank file rebuilt with a reason; the evaluator reusing its rows; the loss holding it (moved once, the
query's precision kept, sharded over ranks); and the bank and its loss over two processes."""

import json
import logging
import os
import pickle

import datasets
import pytest
import torch
import ddp_bank
from conftest import run_two_processes, solid_images, tiny_model
from multivector_family import MultiVectorConfig, MultiVectorModel
from safetensors.torch import load_file

import trainers.candidate_bank as cb
import trainers.evaluation.evaluator as ev
from modeling_spn4cir import CLIP4CIRImageProcessor
from modeling_spn4cir.image_store import ImageStore
from modeling_spn4cir.loading import load_cir_model_and_processor
from trainers.bank_extras import ExtraImages, add_extra_negatives
from trainers.candidate_bank import (
    CandidateBank,
    ShardedRows,
    bank_image_ids,
    load_or_build_candidate_bank,
)
from trainers.cir_trainer import CIRTrainer, CIRTrainingArguments, candidate_bank_loss
from trainers.evaluation import CIREvaluator
from trainers.losses import CandidateBankLoss, ShardedCandidateBankLoss


N_FILES = 6  # images of the file-backed corpus; shard_size 2 -> 3 shards


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
    assert "target_side_weights" in caplog.text
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
    with pytest.raises(IndexError, match=rf"row {N_TOKENS} is out of range for 'reference_features', which has "
                                         rf"{N_TOKENS} rows \(valid: -{N_TOKENS} to {N_TOKENS - 1}\)"):
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

    def rebuilt(shard, why, rows):
        """The bank rebuilt after `shard` was damaged: the log names it and `why`, only its `rows` are encoded."""
        caplog.clear()
        counter = _counting(monkeypatch)
        with caplog.at_level(logging.WARNING):
            bank = _build(model, store, processor, ids, bank_dir, shard_size=3)
        assert shard.name in caplog.text and why in caplog.text
        assert counter.calls == [rows]
        _assert_same_bank(bank, whole)

    # truncated behind a complete bank.json: the warm start's size and header checks catch it
    shard = bank_dir / "bank-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    rebuilt(shard, "truncated", ids[3:6])

    # a garbled header behind a complete bank.json
    shard = bank_dir / "bank-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(b"\xff" * 16 + data[16:])
    rebuilt(shard, "cannot be read", ids[9:10])

    # flipped data bytes (same size, valid header) found when a killed build resumes: the sha256 check
    shard = bank_dir / "bank-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-8:] = bytes(255 - b for b in data[-8:])
    shard.write_bytes(bytes(data))
    (bank_dir / "bank.json").unlink()
    rebuilt(shard, "sha256", ids[6:9])


def test_unreadable_shard_error_names_the_file(tmp_path):
    bad = tmp_path / "bank-00000.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(RuntimeError, match="bank-00000.safetensors"):
        ShardedRows([bad], [2], "reference_features", (4,), torch.float32)


# ------------------------------------------------------------------------------------ the loss
def test_bank_is_converted_and_moved_once_never_per_step():
    bank = torch.nn.functional.normalize(torch.randn(10, 8), dim=-1).to(torch.bfloat16)
    seen = []

    def similarity(q, t):
        seen.append(t.data_ptr())
        return q @ t.T

    loss_fn = CandidateBankLoss(bank, 0.05, similarity=similarity, device="cpu")
    assert loss_fn.bank.dtype == torch.float32  # the compute dtype, once, at construction
    q = torch.randn(4, 8, requires_grad=True)
    for _ in range(3):
        loss = loss_fn(q, torch.tensor([0, 3, 5, 9]))
        loss.backward()
    assert loss.dtype == torch.float32 and q.grad.dtype == torch.float32
    assert seen == [loss_fn.bank.data_ptr()] * 3  # every step scores the same buffer: no copy, no upcast


def test_query_and_loss_stay_fp32_with_a_bf16_bank(tiny_cir_dataset, tiny_model_dir, tmp_path):
    model, processor = load_cir_model_and_processor(str(tiny_model_dir))
    train = datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="train")
    corpus = datasets.load_dataset(str(tiny_cir_dataset), "corpus", split="train")
    args = CIRTrainingArguments(output_dir=str(tmp_path / "out"), stage="candidate_bank", report_to=[], use_cpu=True,
                                disable_tqdm=True, bank_dtype="bfloat16", per_device_train_batch_size=4)
    trainer = CIRTrainer(model, args, train_dataset=train, corpus=corpus, processor=processor)
    assert trainer.bank.target_embeds.dtype == trainer.bank.reference_features.dtype == torch.bfloat16
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["reference_features"].dtype == torch.bfloat16
    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    assert outputs.query_embeds.dtype == torch.float32 and loss.dtype == torch.float32
    # the loss equals fp32 scoring of the stored bf16 values: nothing was rounded to bf16 on the way
    with torch.no_grad():
        q = model.get_query_embeds(batch["input_ids"], batch["attention_mask"],
                                   reference_features=batch["reference_features"].float())
    expected = CandidateBankLoss(trainer.bank.target_embeds.float(), model.config.temperature)(q, batch["target_index"])
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------- warm start and changed images
@pytest.fixture
def files_corpus(tmp_path):
    """A corpus of PNG files referenced by path (the bytes stay in the files)."""
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i, image in enumerate(solid_images(N_FILES, seed=3)):
        path = folder / f"c{i}.png"
        image.save(path, compress_level=0)  # uncompressed: the file size depends only on the image size
        paths.append(str(path))
    corpus = datasets.Dataset.from_dict({"image_id": [f"c{i}" for i in range(N_FILES)], "image": paths})
    return corpus.cast_column("image", datasets.Image()), paths


def _build_files(model, store, bank_dir, **kw):
    return load_or_build_candidate_bank(model, store, [f"c{i}" for i in range(N_FILES)], CLIP4CIRImageProcessor(size=32),
                                        bank_dir=bank_dir, batch_size=4, show_progress_bar=False, shard_size=2, **kw)


class _Counter:
    def __init__(self, monkeypatch):
        self.reads, self.encoded = [], []
        raw, encode = ImageStore.raw, cb.encode_images

        def counting_raw(store, image_id):
            self.reads.append(image_id)
            return raw(store, image_id)

        def counting_encode(fn, images, image_ids, *a, **k):
            self.encoded += list(image_ids)
            return encode(fn, images, image_ids, *a, **k)

        monkeypatch.setattr(ImageStore, "raw", counting_raw)
        monkeypatch.setattr(cb, "encode_images", counting_encode)

    def reset(self):
        self.reads, self.encoded = [], []


def test_warm_start_reads_no_image_byte_and_a_rewritten_image_is_still_detected(files_corpus, tmp_path, monkeypatch,
                                                                                caplog):
    corpus, paths = files_corpus
    model = tiny_model("vit", "sum").eval()
    counter = _Counter(monkeypatch)
    first = _build_files(model, ImageStore(corpus), tmp_path / "bank")
    assert sorted(counter.reads) == [f"c{i}" for i in range(N_FILES)] and len(counter.encoded) == N_FILES  # cold: hashed once
    counter.reset()
    warm = _build_files(model, ImageStore(corpus), tmp_path / "bank")
    assert counter.reads == [] and counter.encoded == []  # warm: file metadata only
    assert torch.equal(warm.target_embeds, first.target_embeds)

    # touched (same bytes, new mtime): re-hashed, nothing re-encoded, and the next start is read-free again
    os.utime(paths[1], ns=(1, 1))
    counter.reset()
    _build_files(model, ImageStore(corpus), tmp_path / "bank")
    assert counter.encoded == [] and set(counter.reads) == {"c0", "c1"}  # only c1's shard is re-hashed
    counter.reset()
    _build_files(model, ImageStore(corpus), tmp_path / "bank")
    assert counter.reads == []

    # rewritten with other pixels, same size and the old mtime put back: still detected, only its shard re-encoded
    before = os.stat(paths[4])
    other = tmp_path / "other.png"
    solid_images(1, seed=99)[0].save(other, compress_level=0)
    with open(paths[4], "r+b") as f:  # in place: same inode
        f.write(other.read_bytes())
    os.utime(paths[4], ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(paths[4]).st_size == before.st_size and os.stat(paths[4]).st_mtime_ns == before.st_mtime_ns
    counter.reset()
    with caplog.at_level(logging.INFO):
        _build_files(model, ImageStore(corpus), tmp_path / "bank")
    assert "image_content" in caplog.text
    assert sorted(counter.encoded) == ["c4", "c5"]


# ------------------------------------------------------------------- broken or foreign bank files
def test_foreign_truncated_or_malformed_bank_files_are_rebuilt_with_a_reason(files_corpus, tmp_path, monkeypatch,
                                                                              caplog):
    corpus, _ = files_corpus
    model, other = tiny_model("vit", "sum", seed=0).eval(), tiny_model("vit", "sum", seed=1).eval()
    good = _build_files(model, ImageStore(corpus), tmp_path / "bank")
    _build_files(other, ImageStore(corpus), tmp_path / "other")
    counter = _Counter(monkeypatch)

    # a shard of another model (same shapes and size) copied over: its bytes are verified and refused
    (tmp_path / "bank" / "bank-00001.safetensors").write_bytes((tmp_path / "other" / "bank-00001.safetensors").read_bytes())
    with caplog.at_level(logging.WARNING):
        again = _build_files(model, ImageStore(corpus), tmp_path / "bank")
    assert "bank-00001.safetensors" in caplog.text and "sha256" in caplog.text
    assert sorted(counter.encoded) == ["c2", "c3"]
    assert torch.equal(again.target_embeds, good.target_embeds)

    # malformed bank.json / manifests (not JSON, JSON of the wrong shape) and a truncated shard: no crash
    bank = tmp_path / "bank"
    (bank / "bank.json").write_text("[1, 2")
    (bank / "bank-00000.json").write_text(json.dumps([1, 2]))
    (bank / "bank-00001.json").write_text(json.dumps({"fingerprint": 3, "start": "x"}))
    data = (bank / "bank-00002.safetensors").read_bytes()
    (bank / "bank-00002.safetensors").write_bytes(data[: len(data) // 2])
    counter.reset()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = _build_files(model, ImageStore(corpus), bank)
    assert "bank.json cannot be read" in caplog.text and "truncated" in caplog.text
    assert sorted(counter.encoded) == [f"c{i}" for i in range(N_FILES)]
    assert torch.equal(again.target_embeds, good.target_embeds)
    # and the manifest of a good shard with a wrong shape of fields is a reason, not a crash
    manifest = json.loads((bank / "bank-00000.json").read_text())
    manifest["stop"] = "not a number"
    (bank / "bank-00000.json").write_text(json.dumps(manifest))
    counter.reset()
    _build_files(model, ImageStore(corpus), bank)
    assert sorted(counter.encoded) == ["c0", "c1"]


# --------------------------------------------------------------------------- evaluation reuse
def test_stage2_evaluator_encodes_no_gallery_image_the_bank_holds(tiny_cir_dataset, tiny_model_dir, tmp_path,
                                                                   monkeypatch):
    model, processor = load_cir_model_and_processor(str(tiny_model_dir))
    train = datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="train")
    val = datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="val")
    corpus = datasets.load_dataset(str(tiny_cir_dataset), "corpus", split="train")
    gallery_corpus = datasets.load_dataset(str(tiny_cir_dataset), "corpus", split="val")
    evaluator = CIREvaluator(gallery_corpus, val, processor.image_processor, processor, show_progress_bar=False)
    args = CIRTrainingArguments(output_dir=str(tmp_path / "out"), stage="candidate_bank", report_to=[], use_cpu=True,
                                disable_tqdm=True, bank_dir=str(tmp_path / "bank"))
    trainer = CIRTrainer(model, args, train_dataset=train, corpus=corpus, processor=processor, evaluator=evaluator)
    encoded = []
    original = ev.encode_images

    def recording(fn, images, image_ids, *a, **k):
        encoded.extend(image_ids)
        return original(fn, images, image_ids, *a, **k)

    monkeypatch.setattr(ev, "encode_images", recording)
    metrics = trainer.evaluate()
    # images are matched by their bytes' sha256, whatever their ids in each corpus (here "img05" and "img05.png")
    held = {image_id.removesuffix(".png") for image_id in trainer.bank.image_ids}
    gallery = set(gallery_corpus["image_id"])
    assert encoded and not held & {e.removesuffix(".png") for e in encoded}  # nothing the bank holds...
    assert set(encoded) == {g for g in gallery if g.removesuffix(".png") not in held}  # ...everything it does not
    fresh = CIREvaluator(gallery_corpus, val, processor.image_processor, processor, show_progress_bar=False)(model)
    for key, value in fresh.items():
        assert metrics[f"eval_{key}"] == pytest.approx(value, abs=1e-9), key

    # a model whose target side is not the bank's encodes the whole gallery
    with torch.no_grad():
        model.visual_projection.weight.mul_(2.0)
    encoded.clear()
    evaluator(model)
    assert set(encoded) == gallery


def test_shard_bank_gives_each_rank_its_block_of_rows(tmp_path, monkeypatch):
    import modeling_spn4cir.distributed as distributed

    bank = CandidateBank([f"c{i}" for i in range(7)], torch.randn(7, 4), torch.randn(7, 4), {})
    args = CIRTrainingArguments(output_dir=str(tmp_path), stage="candidate_bank", report_to=[], use_cpu=True,
                                shard_bank=True)
    assert type(candidate_bank_loss(bank, args, 0.05, None)) is CandidateBankLoss  # one process: the whole bank
    monkeypatch.setattr(distributed, "world", lambda from_env=False: (1, 2))  # rank 1 of 2
    loss_fn = candidate_bank_loss(bank, args, 0.05, None)
    assert isinstance(loss_fn, ShardedCandidateBankLoss) and (loss_fn.start, loss_fn.stop, loss_fn.num_rows) == (3, 7, 7)
    assert torch.equal(loss_fn.bank, bank.target_embeds[3:7])
    args.num_negatives = 2
    with pytest.raises(ValueError, match="--shard_bank.*--num_negatives"):
        candidate_bank_loss(bank, args, 0.05, None)


# ------------------------------------------------------------------------- two processes
@pytest.mark.slow
def test_two_process_sharded_bank_loss_gradients_and_split_build(tmp_path):
    out = tmp_path / "out.pt"
    run_two_processes("ddp_bank.py", out, tmp_path / "bank")
    got = torch.load(out, weights_only=True)

    # one process, the whole batch against the whole bank
    x, bank, targets = ddp_bank.problem()
    model = ddp_bank.Query()
    q, tau = model(x)
    single = CandidateBankLoss(bank)(q, targets, tau)
    single.backward()
    for split in ("even", "uneven"):
        sharded, full = got[f"sharded-{split}"], got[f"full-{split}"]
        # each rank's loss is the unsharded loss of its queries; their mean is the global loss
        torch.testing.assert_close(sharded["losses"], full["losses"], atol=1e-6, rtol=0)
        torch.testing.assert_close(sharded["losses"].mean(), single.detach(), atol=1e-6, rtol=0)
        for name, param in model.named_parameters():  # DDP-averaged gradients = one-process gradients
            torch.testing.assert_close(sharded["grads"][name], param.grad, atol=1e-5, rtol=0, msg=f"{split} {name}")
        assert sharded["grads"]["log_tau"].abs() > 0  # the temperature's gradient crosses the shards too
        assert sharded["rows_held"] == [6, 7] and full["rows_held"] == [13, 13]  # each rank holds 1/W of the bank

    # the bank built over two ranks (stored, and in memory) equals one process's
    ids = [f"c{i}" for i in range(7)]
    corpus = datasets.Dataset.from_dict({"image_id": ids, "image": solid_images(7)},
                                        features=datasets.Features({"image_id": datasets.Value("string"),
                                                                    "image": datasets.Image()}))
    one = load_or_build_candidate_bank(tiny_model("vit", "sum").eval(), ImageStore(corpus), ids,
                                       CLIP4CIRImageProcessor(size=32), batch_size=2, show_progress_bar=False,
                                       shard_size=2)
    for where in ("dir", "memory"):
        two = got[f"bank-{where}"]
        torch.testing.assert_close(two["target"], one.target_embeds)
        torch.testing.assert_close(two["reference"], one.reference_features)
        assert two["fingerprint"] == one.fingerprint
        first, second = two["encoded_by_rank"]  # both ranks encoded, each image once
        assert first and second and sorted(first + second) == ids
    assert sorted(p.name for p in (tmp_path / "bank").glob("bank-*.safetensors")) == [
        f"bank-{k:05d}.safetensors" for k in range(4)]
    # extra negatives appended over two ranks equal one process's
    one_extra = add_extra_negatives(one, tiny_model("vit", "sum").eval(),
                                    ExtraImages(ImageStore(ddp_bank.extra_corpus()), ddp_bank.EXTRA_IDS, "pool"),
                                    ImageStore(corpus), CLIP4CIRImageProcessor(size=32), batch_size=2,
                                    show_progress_bar=False, shard_size=2).extra
    for where in ("dir", "memory"):
        two = got[f"extra-{where}"]
        torch.testing.assert_close(two["target"], one_extra.target_embeds)
        assert two["fingerprint"] == one_extra.fingerprint
        first, second = two["encoded_by_rank"]
        assert first and second and sorted(first + second) == ddp_bank.EXTRA_IDS
    assert len(list((tmp_path / "bank").glob("extra-*.safetensors"))) == 3


def test_runs_sharing_a_bank_dir_never_read_each_others_shards(parts, tmp_path, caplog):
    """A second run waits while another holds the bank directory, then loads what is there; a bank rebuilt by
    another model under a loaded one changes nothing it reads, and a reopened view (a spawned worker) refuses."""
    import threading

    from conftest import lock_held_elsewhere

    model, store, processor, ids = parts
    bank_dir = tmp_path / "bank"
    first = _build(model, store, processor, ids, bank_dir)
    rows = first.reference_features.to_tensor()
    results = []
    with caplog.at_level(logging.WARNING, logger="modeling_spn4cir.storage.locks"):
        with lock_held_elsewhere(bank_dir) as pid:
            waiting = threading.Thread(target=lambda: results.append(_build(model, store, processor, ids, bank_dir)))
            waiting.start()
            waiting.join(timeout=1.0)
            assert waiting.is_alive() and not results  # it waits for the holder, reading nothing meanwhile
        waiting.join(timeout=60)
    assert f"pid {pid}" in caplog.text and str(bank_dir) in caplog.text
    _assert_same_bank(results[0], first)  # then reuses the bank it found

    other = tiny_model("vit", "sum", seed=1).eval()  # another model's run rebuilds the bank in the same directory
    rebuilt = _build(other, store, processor, ids, bank_dir)
    assert not torch.equal(rebuilt.target_embeds, first.target_embeds)
    assert torch.equal(first.reference_features.to_tensor(), rows)  # the loaded bank still reads its own rows
    with pytest.raises(RuntimeError, match=r"bank-00000.safetensors of 'reference_features' is no longer the file"):
        pickle.loads(pickle.dumps(first.reference_features))[0]
