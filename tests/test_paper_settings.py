"""The original's procedure (issue: paper-faithful SPN): CLIP towers in eval mode during training, the
positive-scaling pool, the paper configs (each loads and runs on a tiny official-layout benchmark), and the
automatic stage-2 de-duplication."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import run_cir
import torch
from conftest import tiny_model, tiny_tokenizer
from PIL import Image

CONFIGS = sorted((Path(run_cir.__file__).parent / "configs").glob("*.json"))


# ------------------------------------------------------------------------------ row 1: BatchNorm
def _rn_model_dir(tmp_path, **config):
    from modeling_spn4cir import CLIP4CIRImageProcessor, CLIP4CIRProcessor

    model = tiny_model("resnet", "sum", **config)
    model.config.text_config.eos_token_id = model.text_model.eos_token_id = 3  # the tiny tokenizer's <eot>
    processor = CLIP4CIRProcessor(image_processor=CLIP4CIRImageProcessor(size=64),
                                  tokenizer=tiny_tokenizer(["make it blue", "red circle", "and more"]))
    return model, processor


def _batchnorm_buffers(model):
    return {n: b.clone() for n, b in model.vision_model.named_buffers() if "running" in n or "num_batches" in n}


@pytest.mark.parametrize("clip_train_mode", [False, True])
def test_stage1_step_keeps_resnet_batchnorm_statistics(tiny_cir_dataset, tmp_path, clip_train_mode):
    from trainers.cir_trainer import CIRTrainer, CIRTrainingArguments

    model, processor = _rn_model_dir(tmp_path, clip_train_mode=clip_train_mode)
    train = datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="train")
    corpus = datasets.load_dataset(str(tiny_cir_dataset), "corpus", split="train")
    pixels = processor.image_processor([Image.new("RGB", (40, 40), (200, 30, 30))], return_tensors="pt")["pixel_values"]
    stats = _batchnorm_buffers(model)
    assert stats
    conv = model.vision_model.conv1.weight.clone()
    args = CIRTrainingArguments(output_dir=str(tmp_path / "out"), stage="in_batch", per_device_train_batch_size=4,
                                max_steps=1, learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True,
                                save_strategy="no")
    CIRTrainer(model, args, train_dataset=train, corpus=corpus, processor=processor).train()
    assert not torch.equal(model.vision_model.conv1.weight, conv)  # the step did train the image tower
    after = _batchnorm_buffers(model)
    unchanged = all(torch.equal(stats[n], after[n]) for n in stats)
    model.train()
    with torch.no_grad():
        in_train_mode = model.get_target_embeds(pixels)
        model.eval()
        in_eval_mode = model.get_target_embeds(pixels)
    if clip_train_mode:  # the option: BatchNorm in training mode moves its statistics and uses batch ones
        assert not unchanged and not torch.equal(in_train_mode, in_eval_mode)
    else:  # the original (CLIP4Cir's clip_model.eval())
        assert unchanged
        assert torch.equal(in_train_mode, in_eval_mode)


def test_combiner_dropout_still_follows_train_mode():
    model = tiny_model("resnet", "combiner").train()
    assert model.combiner.training and not model.vision_model.training and not model.text_model.training


# ------------------------------------------------------------------------------ tiny official layouts
def _png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)


def _dump(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def fiq_root(tmp_path):
    """FashionIQ layout: per category 6 train images, 2 train triplets (so 2 images in no triplet), 4 val images and
    2 val triplets; dress image D3 has the same pixels as D1 (a duplicate the de-duplication must merge)."""
    root = tmp_path / "fiq"
    seed = 0
    for cat, p in (("dress", "D"), ("shirt", "S"), ("toptee", "T")):
        train = [f"{p}{i}" for i in range(6)]
        val = [f"{p}V{i}" for i in range(4)]
        test = [f"{p}X0"]
        _dump(root / "image_splits" / f"split.{cat}.train.json", train)
        _dump(root / "image_splits" / f"split.{cat}.val.json", val)
        _dump(root / "image_splits" / f"split.{cat}.test.json", test)
        _dump(root / "captions" / f"cap.{cat}.train.json", [
            {"candidate": train[0], "target": train[1], "captions": ["is red", "is longer"]},
            {"candidate": train[2], "target": train[3], "captions": ["is blue", "has buttons"]}])
        _dump(root / "captions" / f"cap.{cat}.val.json", [
            {"candidate": val[0], "target": val[1], "captions": ["is green", "shorter"]},
            {"candidate": val[2], "target": val[3], "captions": ["is black", "no sleeves"]}])
        _dump(root / "captions" / f"cap.{cat}.test.json", [{"candidate": test[0], "captions": ["a", "b"]}])
        for image_id in train + val + test:
            seed += 1
            _png(root / "images" / f"{image_id}.png", seed)
    (root / "images" / "D3.png").write_bytes((root / "images" / "D1.png").read_bytes())
    return root


@pytest.fixture
def cirr_root(tmp_path):
    from conftest import FIXTURES

    real = json.loads((FIXTURES / "annotations" / "real_records.json").read_text())
    root = tmp_path / "cirr_root"
    for split in ("val", "test1"):
        paths = real[f"cirr_{split}_paths"]
        _dump(root / "cirr" / "captions" / f"cap.rc2.{split}.json", real[f"cirr_{split}"])
        _dump(root / "cirr" / "image_splits" / f"split.rc2.{split}.json", paths)
        for i, relative in enumerate(paths.values()):
            _png(root / relative, 100 + i + (50 if split == "test1" else 0))
    names = [f"train-{i}-0-img0" for i in range(6)]
    _dump(root / "cirr" / "image_splits" / "split.rc2.train.json", {n: f"./train/1/{n}.png" for n in names})
    _dump(root / "cirr" / "captions" / "cap.rc2.train.json", [
        {"pairid": i, "reference": names[i], "target_hard": names[i + 1], "caption": "add a dog",
         "img_set": {"id": i, "members": names[:6]}} for i in range(4)])
    for i, n in enumerate(names):
        _png(root / "train" / "1" / f"{n}.png", 7 + i)
    return root


@pytest.fixture
def tiny_vit_dir(tmp_path):
    from modeling_spn4cir import CLIP4CIRImageProcessor, CLIP4CIRProcessor

    model = tiny_model("vit", "sum")
    model.config.text_config.eos_token_id = model.text_model.eos_token_id = 3
    processor = CLIP4CIRProcessor(image_processor=CLIP4CIRImageProcessor(size=32),
                                  tokenizer=tiny_tokenizer(["is red", "add a dog", "and more"]))
    model.save_pretrained(tmp_path / "vit")
    processor.save_pretrained(tmp_path / "vit")
    return tmp_path / "vit"


# ------------------------------------------------------------------------------ row 5: the pool
@pytest.mark.parametrize("pool", ["triplet_images", "corpus"])
def test_positive_scaling_pairs_within_triplet_images(fiq_root, tiny_vit_dir, tmp_path, monkeypatch, pool):
    import generate_triplets

    monkeypatch.setenv("SPN4CIR_CACHE", str(tmp_path / "cache"))
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("red dress\nblue shirt\n")
    out = tmp_path / f"gen_{pool}"
    # random pairs with k = pool size - 1: every pool image is every reference's target once
    generate_triplets.main([
        "--dataset", "fashioniq", "--data_dir", str(fiq_root), "--output_dir", str(out), "--captioner", "retrieval",
        "--encoder", str(tiny_vit_dir), "--phrases", str(phrases), "--random_pairs", "--k", "100",
        "--templates", "2", "--pool", pool, "--caption_cache_dir", str(tmp_path / f"caps_{pool}"),
    ])
    generated = datasets.load_dataset(str(out), "triplets", split="train")
    used = set(generated["reference_id"]) | set(generated["target_id"])
    in_triplets = {f"{p}{i}" for p in "DST" for i in range(4)}
    outside = {f"{p}{i}" for p in "DST" for i in (4, 5)}
    if pool == "triplet_images":
        assert used == in_triplets
    else:
        assert used == in_triplets | outside


def test_K_keeps_a_random_subset_of_the_generated_triplets(fiq_root, tiny_vit_dir, tmp_path, monkeypatch):
    import generate_triplets

    monkeypatch.setenv("SPN4CIR_CACHE", str(tmp_path / "cache"))
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("red dress\nblue shirt\n")
    common = ["--dataset", "fashioniq", "--data_dir", str(fiq_root), "--captioner", "retrieval",
              "--encoder", str(tiny_vit_dir), "--phrases", str(phrases), "--random_pairs",
              "--caption_cache_dir", str(tmp_path / "caps")]
    generate_triplets.main(common + ["--output_dir", str(tmp_path / "all")])
    generate_triplets.main(common + ["--output_dir", str(tmp_path / "five"), "--K", "5"])
    every = datasets.load_dataset(str(tmp_path / "all"), "triplets", split="train")
    five = datasets.load_dataset(str(tmp_path / "five"), "triplets", split="train")
    pairs = set(zip(every["reference_id"], every["target_id"]))
    assert len(every) == 12 and len(five) == 5  # k=1: one per triplet image, then 5 of them
    assert set(zip(five["reference_id"], five["target_id"])) <= pairs
    corpus = datasets.load_dataset(str(tmp_path / "five"), "corpus", split="train")
    assert set(corpus["image_id"]) == set(five["reference_id"]) | set(five["target_id"])
    with pytest.raises(ValueError, match="num_triplets=13 but 12 triplets"):
        generate_triplets.main(common + ["--output_dir", str(tmp_path / "x"), "--K", "13"])


# ------------------------------------------------------------------------------ configs
def test_configs_are_listed_in_help(capsys):
    run_cir.main(["--help"])
    text = capsys.readouterr().out
    for path in CONFIGS:
        assert path.name in text


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_overrides(path):
    config = json.loads(path.read_text())
    model_args, data_args, args = run_cir.parse_args([str(path), "--num_train_epochs", "7", "--fp16", "false"])
    assert args.num_train_epochs == 7 and not args.fp16  # flags after the file override it
    assert args.per_device_train_batch_size == config["per_device_train_batch_size"]
    assert args.learning_rate == config["learning_rate"] and args.temperature == config["temperature"]
    assert args.eval_strategy == "epoch" and args.load_best_model_at_end and args.dataloader_drop_last
    assert args.lr_scheduler_type == "constant" and args.adam_epsilon == 1e-7 and args.weight_decay == 0.01
    if args.stage == "candidate_bank":
        assert data_args.dedup and data_args.extra_triplets  # SPN stage 2: de-duplicated bank, generated positives


def test_clip4cir_stage1_configs_are_clip4cirs_settings():
    for name in ("clip4cir_fiq_stage1.json", "clip4cir_cirr_stage1.json"):
        _, data_args, args = run_cir.parse_args([str(CONFIGS[0].parent / name)])
        # CLIP4Cir README: --num-epochs 100 --batch-size 128 --learning-rate 2e-6; logits x 100 (tau 0.01)
        assert (args.stage, args.per_device_train_batch_size, args.num_train_epochs, args.learning_rate,
                args.temperature) == ("in_batch", 128, 100, 2e-6, 0.01)
        # FashionIQ: the reference kept (CLIP4Cir validate.py); CIRR: its own protocol
        assert data_args.protocol == ("fashioniq" if "fiq" in name else None) and not data_args.extra_triplets


def test_unknown_config_key_is_a_clear_error(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"dataset": "cirr", "learning_rat": 1e-5}))
    with pytest.raises(ValueError, match=r"c.json: unknown keys \['learning_rat'\]"):
        run_cir.parse_args([str(path)])


def _scaled(dataset, split_dir, out):
    """A tiny generated-triplets dataset (SPN's --plus) over the training images."""
    from datasets_scripts.captioners import ColumnCaptioner
    from datasets_scripts.positive_scaling import generate_scaled_triplets

    corpus = datasets.load_dataset(str(split_dir), "corpus", split="train")
    ids = list(dict.fromkeys(corpus["image_id"]))
    return generate_scaled_triplets(corpus, ColumnCaptioner(mapping={i: "a red thing" for i in ids}), out,
                                    rank_window=None, dataset=dataset, show_progress_bar=False).path


@pytest.mark.parametrize("name", [p.name for p in CONFIGS if p.name.startswith("clip4cir")])
def test_clip4cir_config_runs_on_a_tiny_benchmark(name, fiq_root, cirr_root, tiny_vit_dir, tmp_path, monkeypatch):
    from datasets_scripts.load import load_cir_data

    monkeypatch.setenv("SPN4CIR_CACHE", str(tmp_path / "cache"))
    fiq = "_fiq_" in name
    root = fiq_root if fiq else cirr_root
    data = load_cir_data("fashioniq" if fiq else "cirr", str(root))
    overrides = ["--data_dir", str(root), "--model_name_or_path", str(tiny_vit_dir), "--output_dir",
                 str(tmp_path / "out"), "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "8",
                 "--num_train_epochs", "1", "--fp16", "false", "--use_cpu", "true", "--report_to", "none",
                 "--disable_tqdm", "true", "--bank_dir", str(tmp_path / "bank")]
    used = set(data.triplets["train"]["reference_id"]) | set(data.triplets["train"]["target_id"])
    if "stage2" in name:
        scaled = _scaled(data.name, data.path, tmp_path / "scaled")
        overrides += ["--extra_triplets", str(scaled)]
        generated = datasets.load_dataset(str(scaled), "triplets", split="train")
        used |= set(generated["reference_id"]) | set(generated["target_id"])
    results = run_cir.main([str(CONFIGS[0].parent / name), *overrides])
    assert results["train_loss"] > 0 and 0 <= results["eval_average"] <= 100
    state = json.loads(next((tmp_path / "out").glob("checkpoint-*/trainer_state.json")).read_text())
    assert state["best_metric"] == pytest.approx(results["eval_average"])  # best checkpoint by `average`
    saved_tau = json.loads((tmp_path / "out" / "config.json").read_text())["temperature"]
    assert saved_tau == json.loads((CONFIGS[0].parent / name).read_text())["temperature"]  # one tau (0.02 at start)
    if "stage2" in name:
        bank = json.loads((tmp_path / "bank" / "bank.json").read_text())
        # the bank holds each picture once: FashionIQ's D3 is a copy of D1
        assert set(bank["image_ids"]) == used - {"D3"} and (not fiq or {"D1", "D3"} <= used)
        assert (Path(data.path) / "dedup_hashes.train" / "hashes.json").exists()  # the hash cache, complete


# ------------------------------------------------------------------------------ de-duplication
def test_dedup_map_is_cached_and_follows_changes(tmp_path):
    from datasets_scripts.dedup import dedup_map_for
    from modeling_spn4cir.image_store import ImageStore

    images = [Image.fromarray(np.full((8, 8, 3), v, dtype=np.uint8)) for v in (10, 20, 10, 30)]
    corpus = datasets.Dataset.from_dict({"image_id": ["a", "b", "c", "d"], "image": images},
                                        features=datasets.Features({"image_id": datasets.Value("string"),
                                                                    "image": datasets.Image()}))
    cache = tmp_path / "hashes"
    assert dedup_map_for(ImageStore(corpus), ["b", "c", "a", "d"], cache, show_progress_bar=False) == {"a": "c"}
    assert {json.loads(line)["image_id"] for shard in cache.glob("hashes-*.jsonl")
            for line in shard.read_text().splitlines()} == {"a", "b", "c", "d"}
    # a changed image is re-hashed (its stored bytes differ from the cached entry)
    changed = corpus.map(lambda r: {"image": Image.fromarray(np.full((8, 8, 3), 20, dtype=np.uint8))
                                    if r["image_id"] == "d" else r["image"]})
    assert dedup_map_for(ImageStore(changed), ["a", "b", "c", "d"], cache, show_progress_bar=False) == {
        "c": "a", "d": "b"}
