"""Unlabeled images as extra negatives of the stage-2 bank: the rows appended, the de-duplication against the
triplet images, the fingerprint and resume of their store, the errors, the loss over them, and run_cir.py's
`--bank_extra_images` end to end."""

import json
import logging

import datasets
import pytest
import torch
from conftest import solid_images, tiny_model

import trainers.candidate_bank as cb
from modeling_spn4cir import CLIP4CIRImageProcessor
from modeling_spn4cir.image_store import ImageStore
from trainers.bank_extras import ExtraImages, add_extra_negatives
from trainers.candidate_bank import load_or_build_candidate_bank
from trainers.cir_trainer import CIRTrainingArguments, candidate_bank_loss

IMAGES = solid_images(9, seed=3)


def _corpus(ids, images):
    return datasets.Dataset.from_dict({"image_id": list(ids), "image": list(images)},
                                      features=datasets.Features({"image_id": datasets.Value("string"),
                                                                  "image": datasets.Image()}))


@pytest.fixture
def parts():
    """A bank of the triplet images t0..t3 and a pool of 5 more images u0..u4 in the same corpus."""
    model = tiny_model("vit", "sum").eval()
    ids = [f"t{i}" for i in range(4)] + [f"u{i}" for i in range(5)]
    train = ImageStore(_corpus(ids, IMAGES))
    processor = CLIP4CIRImageProcessor(size=32)
    bank = load_or_build_candidate_bank(model, train, ids[:4], processor, show_progress_bar=False)
    return model, train, processor, bank, ids


def _extras(model, train, processor, bank, extra, bank_dir=None, **kw):
    return add_extra_negatives(bank, model, extra, train, processor, bank_dir=bank_dir, batch_size=2,
                               show_progress_bar=False, **kw)


def test_images_in_no_triplet_are_appended_as_negatives_only(parts):
    model, train, processor, bank, ids = parts
    out = _extras(model, train, processor, bank, ExtraImages(train, ids, "pool"))
    assert out.extra.image_ids == ids[4:] and out.extra.dropped["in_triplets"] == 4
    assert len(out) == 4 and out.size == 9  # the triplet rows stay the indexed ones
    with torch.no_grad():
        expected = model.get_target_embeds(processor(train.images(ids[4:]))["pixel_values"])
    torch.testing.assert_close(out.extra.target_embeds, expected)
    torch.testing.assert_close(out.negatives, torch.cat([bank.target_embeds, expected]))
    with pytest.raises(KeyError, match="u0"):
        out.indices(["u0"])  # no query has an extra image as its target


def test_copies_of_triplet_images_are_dropped(parts):
    model, train, processor, bank, ids = parts
    # u9 has t1's bytes, u8 is mapped to u0 (a pixel copy found by the de-duplication), u7 repeats u0's bytes
    pool = _corpus(["t2", "u0", "u9", "u8", "u7", "u1"], [IMAGES[2], IMAGES[4], IMAGES[1], IMAGES[5], IMAGES[4],
                                                          IMAGES[5]])
    bank.dedup_map["u8"] = "u0"
    out = _extras(model, train, processor, bank, ExtraImages(ImageStore(pool), pool["image_id"], "pool"))
    assert out.extra.image_ids == ["u0", "u1"]
    assert out.extra.dropped == {"in_triplets": 1, "mapped_copies": 1, "over_limit": 0, "same_bytes": 2}
    limited = _extras(model, train, processor, bank, ExtraImages(ImageStore(pool), pool["image_id"], "pool", limit=1))
    assert limited.extra.image_ids == ["u0"] and limited.extra.dropped["over_limit"] == 3


def test_stored_extras_are_fingerprinted_resumed_and_never_stale(parts, tmp_path, monkeypatch, caplog):
    model, train, processor, bank, ids = parts
    extra = ExtraImages(train, ids, "pool")
    first = _extras(model, train, processor, bank, extra, tmp_path, shard_size=2)  # 5 images: 3 shards
    assert (tmp_path / "extra.json").exists() and len(list(tmp_path.glob("extra-*.safetensors"))) == 3
    encoded = []
    original = cb.encode_images
    monkeypatch.setattr(cb, "encode_images", lambda fn, store, image_ids, *a, **k: encoded.extend(image_ids)
                        or original(fn, store, image_ids, *a, **k))
    again = _extras(model, train, processor, bank, extra, tmp_path, shard_size=2)
    assert encoded == [] and torch.equal(again.extra.target_embeds, first.extra.target_embeds)
    (tmp_path / "extra-00001.safetensors").unlink()  # a killed build: one shard missing
    _extras(model, train, processor, bank, extra, tmp_path, shard_size=2)
    assert encoded == ["u2", "u3"]
    encoded.clear()
    (tmp_path / "extra-00001.safetensors").write_bytes((tmp_path / "extra-00000.safetensors").read_bytes())
    with caplog.at_level(logging.WARNING):
        fixed = _extras(model, train, processor, bank, extra, tmp_path, shard_size=2)  # another shard's file
    assert "do not match the sha256" in caplog.text
    assert encoded == ["u2", "u3"] and torch.equal(fixed.extra.target_embeds, first.extra.target_embeds)
    fewer = _extras(model, train, processor, bank, ExtraImages(train, ids, "pool", limit=3), tmp_path, shard_size=2)
    assert fewer.extra.fingerprint["image_ids"] != first.extra.fingerprint["image_ids"]
    with torch.no_grad():
        model.visual_projection.weight.add_(0.5)
    retrained = _extras(model, train, processor, bank, extra, tmp_path, shard_size=2)
    assert retrained.extra.fingerprint["target_side_weights"] != first.extra.fingerprint["target_side_weights"]
    assert not torch.allclose(retrained.extra.target_embeds, first.extra.target_embeds)
    assert sorted(p.name for p in tmp_path.glob("bank*")) == []  # the bank's own files are not the extras'


def test_an_extra_corpus_with_other_ids_or_no_images_left_is_an_error(parts):
    model, train, processor, bank, ids = parts
    clash = _corpus(["t0", "w0"], [IMAGES[8], IMAGES[7]])  # 't0' is another picture there
    with pytest.raises(ValueError, match=r"'t0'.*share no id scheme"):
        _extras(model, train, processor, bank, ExtraImages(ImageStore(clash), clash["image_id"], "other"))
    with pytest.raises(ValueError, match="none is left"):
        _extras(model, train, processor, bank, ExtraImages(train, ids[:4], "pool"))
    with pytest.raises(ValueError, match="holds no image"):
        ExtraImages(train, [], "empty")
    with pytest.raises(ValueError, match="positive number"):
        ExtraImages(train, ids, "pool", limit=0)


def test_the_loss_scores_every_row_and_shards_them(parts, tmp_path, monkeypatch):
    model, train, processor, bank, ids = parts
    out = _extras(model, train, processor, bank, ExtraImages(train, ids, "pool"))
    args = CIRTrainingArguments(output_dir=str(tmp_path), stage="candidate_bank", use_cpu=True, report_to=[])
    assert candidate_bank_loss(out, args, 0.1, model.similarity).bank.shape[0] == 9
    monkeypatch.setattr("modeling_spn4cir.distributed.world", lambda *a: (1, 2))  # rank 1 of 2, --shard_bank
    args.shard_bank = True
    sharded = candidate_bank_loss(out, args, 0.1, model.similarity)
    assert (sharded.start, sharded.stop, sharded.num_rows) == (4, 9, 9)
    torch.testing.assert_close(sharded.bank, out.negatives[4:])
    args.shard_bank, args.in_batch_negatives = False, True
    with pytest.raises(ValueError, match="never be used"):
        candidate_bank_loss(out, args, 0.1, model.similarity)


def test_run_cir_appends_the_pool_of_the_training_split(tiny_cir_dataset, tiny_model_dir, tmp_path):
    import run_cir

    def run(out, *extra):
        return run_cir.main(["--model_name_or_path", str(tiny_model_dir), "--dataset", str(tiny_cir_dataset),
                             "--stage", "candidate_bank", "--do_train", "--output_dir", str(out),
                             "--per_device_train_batch_size", "4", "--max_steps", "2", "--report_to", "none",
                             "--use_cpu", "--disable_tqdm", "true", "--save_strategy", "no", "--bank_dir",
                             str(tmp_path / "bank"), *extra])

    plain = run(tmp_path / "plain")
    assert plain["bank_size"] == 21 and plain["bank_extra_negatives"] == 0  # img00..img20 are in train triplets
    results = run(tmp_path / "extra", "--bank_extra_images", f"{tiny_cir_dataset}:train", "--bank_extra_limit", "2")
    saved = json.loads((tmp_path / "extra" / "all_results.json").read_text())
    assert saved["bank_size"] == 23 and saved["bank_extra_negatives"] == 2 == results["bank_extra_negatives"]
    assert saved["bank_extra_dropped"]["over_limit"] == 1  # img21, img22 of img21..img23
    assert '"bank_size": 23' in (tmp_path / "extra" / "README.md").read_text()  # the loss scored all 23 rows
    with pytest.raises(ValueError, match="no split 'nope'"):
        run(tmp_path / "bad", "--bank_extra_images", f"{tiny_cir_dataset}:nope")
    with pytest.raises(ValueError, match="stage 1"):
        run(tmp_path / "s1", "--bank_extra_images", str(tiny_cir_dataset), "--stage", "in_batch")


def test_run_cir_appends_several_sources(tiny_cir_dataset, tiny_model_dir, tmp_path):
    """The training split's pool plus a corpus made from a folder of other images (as the original adds the COCO
    images to CIRR's bank): the rows of both, each once; a source passed twice is an error naming both."""
    import run_cir

    from datasets_scripts.images import build_images

    folder = tmp_path / "coco"
    folder.mkdir()
    for i, image in enumerate(solid_images(3, size=40, seed=11)):
        image.save(folder / f"coco{i}.png")
    coco = build_images(folder, tmp_path / "coco_corpus")

    def run(out, *sources):
        return run_cir.main(["--model_name_or_path", str(tiny_model_dir), "--dataset", str(tiny_cir_dataset),
                             "--stage", "candidate_bank", "--do_train", "--output_dir", str(out),
                             "--per_device_train_batch_size", "4", "--max_steps", "1", "--report_to", "none",
                             "--use_cpu", "--disable_tqdm", "true", "--save_strategy", "no", "--bank_dir",
                             str(tmp_path / "bank"), "--bank_extra_images", *sources])

    results = run(tmp_path / "two", f"{tiny_cir_dataset}:train", str(coco))
    stored = json.loads((tmp_path / "bank" / "extra.json").read_text())
    assert stored["image_ids"] == ["img21.png", "img22.png", "img23.png", "coco0.png", "coco1.png", "coco2.png"]
    assert results["bank_extra_negatives"] == 6 and results["bank_size"] == 21 + 6
    with pytest.raises(ValueError, match="'coco0.png' is in both .*coco_corpus:train and .*coco_corpus:train"):
        run(tmp_path / "twice", str(coco), str(coco))


def test_an_extra_corpus_without_image_ids_names_the_fix(tmp_path):
    from datasets_scripts.load import CIRData, load_extra_corpus

    folder = tmp_path / "web"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": solid_images(2)})}).save_to_disk(folder)
    data = CIRData("mine", datasets.DatasetDict(), datasets.DatasetDict(), "recall", False, str(tmp_path / "mine"))
    with pytest.raises(ValueError, match="fashioniq's converted directory"):
        load_extra_corpus("fashioniq:train", data)
    pool = tmp_path / "pool"
    _corpus(["a"], solid_images(1)).remove_columns("image_id").to_parquet(str(pool / "corpus" / "train.parquet"))
    (pool / "README.md").write_text("---\nconfigs:\n- config_name: corpus\n  data_files:\n  - split: train\n"
                                    "    path: corpus/train.parquet\n---\n")
    with pytest.raises(ValueError, match="no image_id column.*datasets_scripts.custom"):
        load_extra_corpus(str(pool), data)


@pytest.mark.parametrize("dataset,extras", [("fashioniq", {"D4", "D5", "S4", "S5", "T4", "T5"}),
                                              ("cirr", {"train-5-0-img0"})])
def test_the_benchmarks_pool_is_their_train_split_images_in_no_triplet(dataset, extras, fiq_root, cirr_root,
                                                                       tiny_vit_dir, tmp_path, monkeypatch):
    """FashionIQ: 6 train images per category, 4 in its two triplets (D3 is D1's copy); CIRR: train-0..4 in triplets,
    train-5 in none (the COCO images the original adds to CIRR come as a second source, tested above)."""
    import run_cir

    monkeypatch.setenv("SPN4CIR_CACHE", str(tmp_path / "cache"))
    results = run_cir.main([
        "--dataset", dataset, "--data_dir", str(fiq_root if dataset == "fashioniq" else cirr_root),
        "--model_name_or_path", str(tiny_vit_dir), "--stage", "candidate_bank", "--do_train", "--output_dir",
        str(tmp_path / "out"), "--per_device_train_batch_size", "2", "--max_steps", "1", "--use_cpu", "--report_to",
        "none", "--disable_tqdm", "true", "--save_strategy", "no", "--bank_dir", str(tmp_path / "bank"),
        "--bank_extra_images", dataset])
    stored = json.loads((tmp_path / "bank" / "extra.json").read_text())
    assert set(stored["image_ids"]) == extras and results["bank_extra_negatives"] == len(extras)
    bank = json.loads((tmp_path / "bank" / "bank.json").read_text())
    assert results["bank_size"] == len(bank["image_ids"]) + len(extras)
