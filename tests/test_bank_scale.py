"""The candidate bank at scale (issue 16) and its bad-data cases (issue 20): the bank moved once, the query's
precision kept, a warm start that reads no image byte, a changed image still detected, a foreign or broken bank
file rebuilt with a reason, and the evaluator reusing the bank's rows."""

import json
import logging
import os

import datasets
import pytest
import torch
from conftest import solid_images, tiny_model

import trainers.candidate_bank as cb
import trainers.evaluation.evaluator as ev
from datasets_scripts.image_store import ImageStore
from modeling_spn4cir import CLIP4CIRImageProcessor
from modeling_spn4cir.loading import load_cir_model_and_processor
from trainers.candidate_bank import load_or_build_candidate_bank
from trainers.cir_trainer import CIRTrainer, CIRTrainingArguments
from trainers.evaluation import CIREvaluator
from trainers.losses import CandidateBankLoss

N = 6  # images; shard_size 2 -> 3 shards


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
    for i, image in enumerate(solid_images(N, seed=3)):
        path = folder / f"c{i}.png"
        image.save(path, compress_level=0)  # uncompressed: the file size depends only on the image size
        paths.append(str(path))
    corpus = datasets.Dataset.from_dict({"image_id": [f"c{i}" for i in range(N)], "image": paths})
    return corpus.cast_column("image", datasets.Image()), paths


def _build(model, store, bank_dir, **kw):
    return load_or_build_candidate_bank(model, store, [f"c{i}" for i in range(N)], CLIP4CIRImageProcessor(size=32),
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
    first = _build(model, ImageStore(corpus), tmp_path / "bank")
    assert sorted(counter.reads) == [f"c{i}" for i in range(N)] and len(counter.encoded) == N  # cold: hashed once
    counter.reset()
    warm = _build(model, ImageStore(corpus), tmp_path / "bank")
    assert counter.reads == [] and counter.encoded == []  # warm: file metadata only
    assert torch.equal(warm.target_embeds, first.target_embeds)

    # touched (same bytes, new mtime): re-hashed, nothing re-encoded, and the next start is read-free again
    os.utime(paths[1], ns=(1, 1))
    counter.reset()
    _build(model, ImageStore(corpus), tmp_path / "bank")
    assert counter.encoded == [] and set(counter.reads) == {"c0", "c1"}  # only c1's shard is re-hashed
    counter.reset()
    _build(model, ImageStore(corpus), tmp_path / "bank")
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
        _build(model, ImageStore(corpus), tmp_path / "bank")
    assert "image_content" in caplog.text
    assert sorted(counter.encoded) == ["c4", "c5"]


# ------------------------------------------------------------------- broken or foreign bank files
def test_foreign_truncated_or_malformed_bank_files_are_rebuilt_with_a_reason(files_corpus, tmp_path, monkeypatch,
                                                                              caplog):
    corpus, _ = files_corpus
    model, other = tiny_model("vit", "sum", seed=0).eval(), tiny_model("vit", "sum", seed=1).eval()
    good = _build(model, ImageStore(corpus), tmp_path / "bank")
    _build(other, ImageStore(corpus), tmp_path / "other")
    counter = _Counter(monkeypatch)

    # a shard of another model (same shapes and size) copied over: its bytes are verified and refused
    (tmp_path / "bank" / "bank-00001.safetensors").write_bytes((tmp_path / "other" / "bank-00001.safetensors").read_bytes())
    with caplog.at_level(logging.WARNING):
        again = _build(model, ImageStore(corpus), tmp_path / "bank")
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
        again = _build(model, ImageStore(corpus), bank)
    assert "bank.json cannot be read" in caplog.text and "truncated" in caplog.text
    assert sorted(counter.encoded) == [f"c{i}" for i in range(N)]
    assert torch.equal(again.target_embeds, good.target_embeds)
    # and the manifest of a good shard with a wrong shape of fields is a reason, not a crash
    manifest = json.loads((bank / "bank-00000.json").read_text())
    manifest["stop"] = "not a number"
    (bank / "bank-00000.json").write_text(json.dumps(manifest))
    counter.reset()
    _build(model, ImageStore(corpus), bank)
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
    from trainers.candidate_bank import CandidateBank
    from trainers.cir_trainer import candidate_bank_loss
    from trainers.losses import ShardedCandidateBankLoss

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
