"""`examples/run_cir.py`, the training / evaluation CLI: both stages end to end, JSON configs (the paper's settings,
each loading and running on a tiny official-layout benchmark), overrides, unknown keys and `--help`."""

import json
from pathlib import Path

import datasets
import pytest
import run_cir
import torch
from huggingface_hub import ModelCard
from conftest import write_png
from safetensors.torch import load_file

from modeling_spn4cir.loading import load_cir_model_and_processor
from trainers.evaluation import CIREvaluator


@pytest.mark.parametrize("stage", ["in_batch", "candidate_bank"])
def test_run_cir_end_to_end(tiny_cir_dataset, tiny_model_dir, tmp_path, stage):
    out = tmp_path / f"run_{stage}"
    results = run_cir.main([
        "--model_name_or_path", str(tiny_model_dir), "--dataset", str(tiny_cir_dataset), "--stage", stage,
        "--do_train", "--do_eval", "--output_dir", str(out), "--per_device_train_batch_size", "4",
        "--num_train_epochs", "1", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true",
        "--bank_dir", str(tmp_path / "bank"), "--eval_strategy", "epoch", "--save_strategy", "no",
    ])
    saved = json.loads((out / "all_results.json").read_text())
    assert set(saved) == set(results)
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(out / "model.safetensors")
    moved = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    if stage == "in_batch":  # stage 1 trains both towers
        assert {"text_model", "text_projection", "vision_model", "visual_projection"} <= moved
    else:  # stage 2 trains the query side only
        assert moved == {"text_model", "text_projection"}
    for k in ("eval_recall@1", "eval_recall@5", "eval_recall@10", "eval_recall@50"):
        assert 0.0 <= saved[k] <= 100.0
    assert "reference removed" in saved["eval_protocol"] and saved["train_loss"] > 0
    # the trained model reloads and reproduces the reported metrics
    model, processor = load_cir_model_and_processor(str(out))
    evaluator = CIREvaluator(datasets.load_dataset(str(tiny_cir_dataset), "corpus", split="val"),
                             datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="val"),
                             processor.image_processor, processor.tokenizer, show_progress_bar=False)
    again = evaluator(model)
    assert again["recall@10"] == saved["eval_recall@10"]
    card = ModelCard.load(out / "README.md")  # written after the final evaluation: its metrics, its split
    index = {r.metric_type: (r.metric_value, r.dataset_split, r.metric_config) for r in card.data.eval_results}
    assert index == {k: (round(saved[f"eval_{k}"], 4), "val", "recall") for k in ("recall@1", "recall@5", "recall@10",
                                                                                    "recall@50")}
    assert "reference removed" in card.text and f"| recall@10 | {saved['eval_recall@10']:.2f} |" in card.text


def test_run_cir_reads_a_json_config(tmp_path):
    config = {"model_name_or_path": "m", "dataset": "cirr", "data_dir": "d", "stage": "candidate_bank",
              "num_negatives": 100, "output_dir": str(tmp_path / "o"), "protocol": "cirr", "use_cpu": True}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    model_args, data_args, args = run_cir.parse_args([str(path)])
    assert model_args.model_name_or_path == "m" and data_args.dataset == "cirr" and data_args.protocol == "cirr"
    assert args.stage == "candidate_bank" and args.num_negatives == 100 and not args.remove_unused_columns
    with pytest.raises(ValueError, match="stage must be one of"):
        run_cir.parse_args(["--dataset", "x", "--stage", "stage3"])
    config["protocol"] = "fashioniq_remove_refrence"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'fashioniq_remove_refrence'; choose one of .*'fashioniq_remove_reference'"):
        run_cir.parse_args([str(path)])


def test_run_cir_help_shows_both_modes(capsys):
    assert run_cir.main(["--help"]) is None
    text = capsys.readouterr().out
    trainer_options = text.index("transformers.TrainingArguments (the Trainer's own options):")
    # SPN's options and the ready configs come first, each with its default; the Trainer's many options after them
    for spn_flag in ("--model_name_or_path", "--dataset", "--stage", "--bank_dir", "--num_negatives",
                     "--negative_types", "--lora_r", "clip4cir_fiq_stage2.json"):
        assert -1 < text.index(spn_flag) < trainer_options, spn_flag
    assert "in_batch (stage 1) or candidate_bank (stage 2) (default: in_batch)" in " ".join(text.split())
    assert "(default: ['target'])" in text and "(default: float32)" in text
    assert text.index("  --learning_rate LEARNING_RATE") > trainer_options and len(text.splitlines()[0]) < 120
    assert "without `--dataset`" in text and "--oracle_captions" in text and "--size" in text
    assert text.index("--oracle_captions") > text.index("  --learning_rate LEARNING_RATE")  # the recipe's: at the end


def test_run_cir_with_nothing_to_do_is_an_error():
    with pytest.raises(ValueError, match=r"Nothing to do: pass --do_train .* --do_eval .*--eval_split val"):
        run_cir.main(["--dataset", "cirr", "--data_dir", "nowhere", "--model_name_or_path", "nothing/here"])


# SPN4CIR README stage-2 commands (REFERENCE.md 4.1): batch, epochs, lr, tau per family and dataset.
PAPER_STAGE2 = {
    "clip4cir_fiq": (256, 3, 2e-5, 0.02), "clip4cir_cirr": (256, 3, 2e-5, 0.02),
    "tgcir_fiq": (256, 5, 2e-5, 0.02), "tgcir_cirr": (256, 5, 2e-5, 0.01),
    "blip4cir_fiq": (128, 10, 5e-6, 0.03), "blip4cir_cirr": (128, 3, 6e-6, 0.02),
    "sprc_fiq": (32, 3, 1e-5, 0.05), "sprc_cirr": (32, 3, 1e-5, 0.05),
}


@pytest.mark.parametrize("name", sorted(PAPER_STAGE2))
def test_paper_stage2_configs(name):
    path = Path(run_cir.__file__).parent / "configs" / f"{name}_stage2.json"
    model_args, data_args, args = run_cir.parse_args([str(path)])
    batch, epochs, lr, tau = PAPER_STAGE2[name]
    assert (args.per_device_train_batch_size, args.num_train_epochs, args.learning_rate, args.temperature) == \
        (batch, epochs, lr, tau)
    assert args.stage == "candidate_bank" and args.dataloader_drop_last and args.seed == 42
    assert args.load_best_model_at_end and args.metric_for_best_model == "average" and args.greater_is_better
    assert data_args.dataset == ("fashioniq" if name.endswith("fiq") else "cirr") and data_args.extra_triplets
    # SPN4CIR's CLIP4CIR FashionIQ protocol removes the reference; every other config keeps its dataset's protocol
    assert data_args.protocol == ("fashioniq_remove_reference" if name == "clip4cir_fiq" else None)


CONFIGS = sorted((Path(run_cir.__file__).parent / "configs").glob("*.json"))


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
    assert args.lr_scheduler_type == "constant" and args.adam_epsilon == 1e-7  # the rest: test_configs_train_with_the_originals_optimizer
    if args.stage == "candidate_bank" and not path.name.startswith("zeroshot"):
        assert data_args.dedup and data_args.extra_triplets  # SPN stage 2: de-duplicated bank, generated positives


# zscir/ (REFERENCE.md 3): CLIP ViT-L/14, sum fusion; base: batch 48, 10 epochs, lr 2e-6, tau 0.01; bank: batch 128,
# 5 epochs, lr 2e-6, tau 0.02; trained on generated triplets only; best.pt by the benchmark's val average.
@pytest.mark.parametrize("short", ["fiq", "cirr"])
def test_zero_shot_configs_are_the_papers_settings(short):
    stage1, stage2 = (run_cir.parse_args([str(CONFIGS[0].parent / f"zeroshot_{short}_stage{n}.json")])
                      for n in (1, 2))
    for (model_args, data_args, args), expected in zip((stage1, stage2), (("in_batch", 48, 10, 2e-6, 0.01),
                                                                          ("candidate_bank", 128, 5, 2e-6, 0.02))):
        assert (args.stage, args.per_device_train_batch_size, args.num_train_epochs, args.learning_rate,
                args.temperature) == expected
        assert model_args.fusion == "sum" and model_args.preprocessing == "targetpad"
        assert data_args.train_dataset == [f"zeroshot-{short}-triplets"] and not data_args.extra_triplets
        assert data_args.dataset == ("fashioniq" if short == "fiq" else "cirr")
        # zscir/validate.py deletes the reference on FashionIQ, as SPN's CLIP4CIR code
        assert data_args.protocol == ("fashioniq_remove_reference" if short == "fiq" else None)
        assert args.adam_epsilon == 1e-7 and args.seed == 42 and args.metric_for_best_model == "average"
    assert stage1[0].model_name_or_path == "openai/clip-vit-large-patch14"
    assert stage2[0].model_name_or_path == stage1[2].output_dir  # stage 2 starts from stage 1's best checkpoint
    assert not stage2[1].dedup  # zscir's bank dataset reads no optimized_images.json


TRIPLET_CONFIGS = Path(run_cir.__file__).parent / "configs" / "triplets"


# zscir/get_cir_data.py + captioner_llava.py (REFERENCE.md 4.3 step 4): random pairs, k=1, seed 42; out of domain
# (CC3M) 10-word captions, FashionIQ template 2, CIRR templates 0/1; in domain FashionIQ 5 words, CIRR 10.
@pytest.mark.parametrize("name, dataset, words, templates", [
    ("zeroshot_cc_fiq", None, 10, ["{1}"]), ("zeroshot_cc_cirr", None, 10, ["{1} instead of {0}",
                                                                          "Unlike {0}, I want {1}"]),
    ("zeroshot_fiq", "fashioniq", 5, ["{1}"]), ("zeroshot_cirr", "cirr", 10, ["{1} instead of {0}",
                                                                               "Unlike {0}, I want {1}"])])
def test_zero_shot_triplet_configs_are_the_papers_settings(name, dataset, words, templates):
    import generate_triplets

    from datasets_scripts.templates import resolve_templates

    args = generate_triplets.parse_args([str(TRIPLET_CONFIGS / f"{name}.json"), "--seed", "7"])
    assert args.random_pairs and args.targets_per_reference == 1 and args.num_words == words and args.texts == "templates"
    assert resolve_templates(args.templates) == templates and args.seed == 7  # a flag after the file overrides it
    assert args.pool == ("corpus" if dataset is None else "triplet_images") and (dataset is None or
                                                                                 args.dataset == dataset)
    assert json.loads((TRIPLET_CONFIGS / f"{name}.json").read_text())["seed"] == 42


def test_triplet_config_unknown_key_is_a_clear_error(tmp_path):
    import generate_triplets

    path = tmp_path / "t.json"
    path.write_text(json.dumps({"dataset": "x", "random_pair": True}))
    with pytest.raises(ValueError, match=r"t.json: unknown keys \['random_pair'\]"):
        generate_triplets.parse_args([str(path)])


# The optimizer of each original training script: torch.optim.AdamW over every trainable parameter (one weight decay,
# AdamW's default 0.01 unless given), a constant learning rate without warm-up, an AMP GradScaler, never a clipped
# gradient, and DataLoader(num_workers=4). SPN4CIR: clip4cir/train.py L76-86, tgcir/train.py L79-93, blip4cir/train.py
# L77-91, blip24cir/train.py L75-81 (betas 0.9 / 0.98, weight_decay 0.05); CLIP4Cir clip_fine_tune.py L111-121.
ORIGINAL_ADAMW = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-7, "weight_decay": 0.01}
ORIGINAL_OPTIMIZER = {"clip4cir": ORIGINAL_ADAMW, "tgcir": ORIGINAL_ADAMW, "blip4cir": ORIGINAL_ADAMW,
                      "sprc": {**ORIGINAL_ADAMW, "adam_beta2": 0.98, "weight_decay": 0.05},
                      "zeroshot": ORIGINAL_ADAMW}  # zscir/ trains CLIP4CIR with clip4cir/'s loop


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_configs_train_with_the_originals_optimizer(path):
    _, _, args = run_cir.parse_args([str(path)])
    for key, value in ORIGINAL_OPTIMIZER[path.stem.split("_")[0]].items():
        assert getattr(args, key) == value, key
    assert args.decay_norms_and_biases  # every trainable parameter, biases and LayerNorm weights included
    assert args.max_grad_norm == 0  # never clipped (the Trainer's default would clip at 1.0)
    assert args.optim == "adamw_torch_fused"  # the same AdamW update, one kernel
    assert args.lr_scheduler_type == "constant" and args.warmup_steps == 0 and args.fp16
    # stage 1 decodes images: off the main process as the original's 4 workers; stage 2 batches bank rows
    assert args.dataloader_num_workers == (4 if args.stage == "in_batch" else 0)
    assert not args.group_by_text_length  # the original's random batches (grouping changes which rows share one)


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


@pytest.mark.slow
def test_negative_types_and_extra_negatives_train_end_to_end_under_ddp(tiny_cir_dataset, tiny_model_dir, tmp_path):
    """`run_cir.py` on two gloo processes: stage 1 with `--negative_types target text`, then stage 2 from it with
    `--bank_extra_images` (the train split's images in no triplet as negatives only)."""
    from conftest import run_two_processes

    run_two_processes("ddp_run_cir.py", tiny_model_dir, tiny_cir_dataset, tmp_path)
    assert json.loads((tmp_path / "world.json").read_text())["world_size"] == 2
    stage1 = json.loads((tmp_path / "stage1" / "all_results.json").read_text())
    stage2 = json.loads((tmp_path / "stage2" / "all_results.json").read_text())
    assert stage1["train_loss"] > 0 and stage2["train_loss"] > 0
    corpus = datasets.load_dataset(str(tiny_cir_dataset), "corpus", split="train")["image_id"]
    triplets = datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="train")
    used = set(triplets["reference_id"]) | set(triplets["target_id"])
    assert stage2["bank_extra_negatives"] == len(set(corpus) - used) > 0
    assert stage2["bank_size"] == len(used) + stage2["bank_extra_negatives"]
    assert json.loads((tmp_path / "stage1" / "config.json").read_text())["model_type"] == "clip4cir"


def _png_bytes(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _small_dataset(out, triplets, splits=("train", "val"), val=None):
    """Six 16 px images in every split's corpus and `triplets` in every split (`val`: other ones there): data with
    the faults to probe."""
    from conftest import solid_images

    from datasets_scripts.common import SplitData, write_cir_dataset

    corpus = [{"image_id": f"i{n}", "image_bytes": _png_bytes(image)} for n, image in enumerate(solid_images(6, 16))]
    def rows(records):
        return [{"reference_id": r, "target_id": t, "modification_texts": texts, "source": "annotated"}
                for r, t, texts in records]

    return write_cir_dataset(out, {split: SplitData(corpus=corpus, triplets=rows(val if split == "val" and val else
                                                                                  triplets)) for split in splits})


def test_bad_arguments_and_data_are_named_before_anything_trains(tiny_model_dir, tmp_path):
    from conftest import lock_held_elsewhere

    from modeling_spn4cir.storage import OutputLockedError

    good = [("i0", "i1", ["make it blue"]), ("i2", "i3", ["red circle"]), ("i4", "i5", ["and more"])] * 2
    common = ["--model_name_or_path", str(tiny_model_dir), "--do_train", "--per_device_train_batch_size", "2",
              "--max_steps", "1", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true",
              "--save_strategy", "no", "--output_dir", str(tmp_path / "out")]
    data = str(_small_dataset(tmp_path / "good", good))

    def run(*flags, dataset=data):
        return run_cir.main(["--dataset", dataset, *common, *flags])

    with pytest.raises(ValueError, match=r"--max_train_samples must be a positive number of triplets, got 0"):
        run("--max_train_samples", "0")  # used to train on the whole split
    with pytest.raises(ValueError, match="--shard_bank .* cannot be combined with --num_negatives"):
        run("--stage", "candidate_bank", "--shard_bank", "--num_negatives", "2")  # used to be ignored in one process
    with pytest.raises(ValueError, match=r"evaluation \(--do_eval / --eval_strategy\) needs the split 'val' "
                                         r"\(--eval_split\), but the triplets config of .* has only \['train'\]"):
        run("--do_eval", dataset=str(_small_dataset(tmp_path / "train_only", good, splits=("train",))))
    ghost = str(_small_dataset(tmp_path / "ghost", good + [("i0", "ghost99", ["make it blue"])]))
    with pytest.raises(ValueError, match=r"triplet 6 \(reference 'i0', target 'ghost99'\) of the training data .* "
                                         r"names a target image the corpus does not hold \(add the image"):
        run("--stage", "candidate_bank", "--bank_dir", str(tmp_path / "bank"), dataset=ghost)  # with dedup
    textless = str(_small_dataset(tmp_path / "textless", good[:2] + [("i4", "i5", ["", "  "])] + good[3:]))
    with pytest.raises(ValueError, match=r"triplet 2 \(reference 'i4', target 'i5'\) of the training data .* has no "
                                         r"modification text .*\['', '  '\]"):
        run(dataset=textless)  # used to fail at the step whose batch held it
    bad_val = str(_small_dataset(tmp_path / "bad_val", good, val=good[:1] + [("i2", "i3", [""])]))
    with pytest.raises(ValueError, match=r"triplet 1 \(reference 'i2', target 'i3'\) of the evaluation split 'val' "
                                         "has no modification text"):
        run("--do_eval", dataset=bad_val)  # named before training, not at the evaluation after it
    with lock_held_elsewhere(tmp_path / "out") as pid, pytest.raises(
            OutputLockedError, match=rf"{tmp_path / 'out'} for this training output: .*pid {pid}"):
        run()
    assert "train_loss" in run()  # the same run, once the other is done


def test_stage2_on_read_only_data_caches_the_dedup_hashes_in_the_cache_dir(tiny_cir_dataset, tiny_model_dir,
                                                                           tmp_path, monkeypatch):
    import errno
    import os

    read_only = str(tiny_cir_dataset.resolve())

    def refuse_writes(call, write_flags=None):
        def guarded(path, *args, **kwargs):
            writes = write_flags is None or (args and args[0] & write_flags)
            if writes and str(Path(path).absolute()).startswith(read_only):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return call(path, *args, **kwargs)
        return guarded

    monkeypatch.setattr(os, "mkdir", refuse_writes(os.mkdir))
    monkeypatch.setattr(os, "open", refuse_writes(os.open, os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    monkeypatch.setenv("SPN4CIR_CACHE", str(tmp_path / "cache"))
    results = run_cir.main([
        "--model_name_or_path", str(tiny_model_dir), "--dataset", str(tiny_cir_dataset), "--stage", "candidate_bank",
        "--do_train", "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "4", "--max_steps", "1",
        "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--save_strategy", "no"])
    assert results["train_loss"] > 0
    assert [p.name for p in tmp_path.joinpath("cache").glob("dedup_hashes-*.train/hashes.json")] == ["hashes.json"]
    assert not list(tiny_cir_dataset.glob("dedup_hashes*"))
# --------------------------------------------------- --train_dataset (training triplets only) and --eval_datasets
def _generated(tiny_cir_dataset, out):
    """Random-pair triplets over the tiny dataset's train corpus, as generate_triplets.py writes them."""
    return _scaled("custom", tiny_cir_dataset, out)


@pytest.mark.parametrize("stage", ["in_batch", "candidate_bank"])
def test_train_dataset_trains_on_its_triplets_only(tiny_cir_dataset, tiny_model_dir, tmp_path, stage):
    generated = _generated(tiny_cir_dataset, tmp_path / "generated")
    triplets = datasets.load_dataset(str(generated), "triplets", split="train")
    annotated = datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="train")
    assert len(triplets) != len(annotated)  # so that the step count tells which set was trained on
    out = tmp_path / "out"
    results = run_cir.main([
        "--model_name_or_path", str(tiny_model_dir), "--train_dataset", str(generated), "--dataset",
        str(tiny_cir_dataset), "--stage", stage, "--do_train", "--do_eval", "--output_dir", str(out),
        "--per_device_train_batch_size", "4", "--num_train_epochs", "1", "--dataloader_drop_last", "true",
        "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--bank_dir", str(tmp_path / "bank"),
        "--save_strategy", "epoch", "--no_dedup"])
    assert results["train_triplets"] == len(triplets) and results["train_datasets"] == [str(generated)]
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{len(triplets) // 4}"]  # its steps
    assert 0 <= results["eval_recall@10"] <= 100 and "reference removed" in results["eval_protocol"]
    if stage == "candidate_bank":  # the bank holds the generated triplets' images, nothing else
        bank = json.loads((tmp_path / "bank" / "bank.json").read_text())
        assert set(bank["image_ids"]) == set(triplets["reference_id"]) | set(triplets["target_id"])
    card = (out / "README.md").read_text()
    assert "Zero-shot references" in card and "65.42" in card and "Pic2Word" in card and f"`{generated.name}`" in card
    assert str(tmp_path) not in card  # the training data by its folder's name, never a local path


def test_eval_datasets_score_each_benchmark_with_its_own_protocol(fiq_root, cirr_root, tiny_cir_dataset,
                                                                   tiny_vit_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPN4CIR_CACHE", str(tmp_path / "cache"))
    common = ["--model_name_or_path", str(tiny_vit_dir), "--do_eval", "--report_to", "none", "--use_cpu",
              "--disable_tqdm", "true", "--per_device_eval_batch_size", "8"]
    together = run_cir.main([*common, "--output_dir", str(tmp_path / "all"), "--eval_datasets",
                             f"fashioniq_remove_reference={fiq_root}", f"cirr={cirr_root}", f"mine={tiny_cir_dataset}"])
    saved = json.loads((tmp_path / "all" / "all_results.json").read_text())
    assert saved == together
    # one run per dataset, as today: the same numbers under the entry's prefix
    alone = {"fashioniq_remove_reference": ["--dataset", "fashioniq", "--data_dir", str(fiq_root), "--protocol",
                                            "fashioniq_remove_reference"],
             "cirr": ["--dataset", "cirr", "--data_dir", str(cirr_root)], "mine": ["--dataset", str(tiny_cir_dataset)]}
    for name, flags in alone.items():
        single = run_cir.main([*common, "--output_dir", str(tmp_path / name), *flags])
        metrics = {k.removeprefix("eval_"): v for k, v in single.items() if k.startswith("eval_") and
                   k not in ("eval_protocol", "eval_epoch")}
        assert metrics and all(together[f"eval_{name}_{k}"] == v for k, v in metrics.items()), name
        assert together[f"eval_{name}_protocol"] == single["eval_protocol"]
    assert "reference removed" in together["eval_fashioniq_remove_reference_protocol"]
    assert together["eval_mine_protocol"].startswith("Recall@K")


def test_eval_datasets_entries_that_name_no_benchmark_are_refused(tmp_path, tiny_cir_dataset, fiq_root):
    from trainers.evaluation.eval_datasets import EvalDatasetError

    photos = tmp_path / "photos"
    write_png(photos / "a.png", 0)
    generated = _generated(tiny_cir_dataset, tmp_path / "generated")
    missing_model = ["--model_name_or_path", str(tmp_path / "no-model"), "--do_eval", "--output_dir", str(tmp_path)]
    cases = {  # checked before any model is loaded (the model path does not exist)
        "fashioniq": r"expected NAME=PATH",
        f"mine={photos}": r"'mine' is not a benchmark, and .*photos is not a dataset in the project schema.*"
                          r"fashioniq=.*photos",
        f"mine={fiq_root}": r"not a dataset in the project schema.*fashioniq=",
        f"cirr={tmp_path / 'nowhere'}": r"nowhere does not exist; pass the cirr official layout",
        "bad name!=x": r"the name 'bad name!' prefixes the metrics",
    }
    for entry, message in cases.items():
        with pytest.raises(EvalDatasetError, match=message):
            run_cir.main([*missing_model, "--eval_datasets", entry])
    with pytest.raises(EvalDatasetError, match="names 'a' twice"):
        run_cir.main([*missing_model, "--eval_datasets", f"a={tiny_cir_dataset}", f"a={generated}"])


def test_eval_datasets_conflicts_are_named_before_loading(tmp_path, tiny_cir_dataset, tiny_model_dir):
    from trainers.evaluation.eval_datasets import EvalDatasetError

    base = ["--model_name_or_path", str(tmp_path / "no-model"), "--output_dir", str(tmp_path / "o")]
    entry = f"mine={tiny_cir_dataset}"
    with pytest.raises(SystemExit, match="would be used for nothing"):
        run_cir.main([*base, "--do_train", "--dataset", "cirr", "--train_dataset", "x", "--eval_datasets", entry])
    with pytest.raises(SystemExit, match=r"name the protocol in the entry instead \(cirr=PATH\)"):
        run_cir.main([*base, "--do_eval", "--protocol", "cirr", "--eval_datasets", entry])
    with pytest.raises(SystemExit, match="--do_train needs training triplets"):
        run_cir.main([*base, "--do_train", "--eval_datasets", entry])
    with pytest.raises(SystemExit, match="--eval_datasets needs --do_eval"):
        run_cir.main([*base, "--do_train", "--train_dataset", "x", "--eval_datasets", entry])
    with pytest.raises(SystemExit, match="--dataset cirr would be used for nothing"):
        run_cir.main([*base, "--do_eval", "--dataset", "cirr", "--eval_datasets", entry])
    # a generated-triplets dataset has no val split: training data, not a benchmark (found once it is read)
    generated = _generated(tiny_cir_dataset, tmp_path / "generated")
    with pytest.raises(EvalDatasetError, match=r"no 'val' split to evaluate.*training data, not a benchmark"):
        run_cir.main(["--model_name_or_path", str(tiny_model_dir), "--do_eval", "--output_dir", str(tmp_path / "e"),
                      "--eval_datasets", f"gen={generated}", "--use_cpu"])
    with pytest.raises(ValueError, match=r"metric_for_best_model 'average' belongs to none of .*\['mine'\].*"
                                         r"mine_recall@10"):
        run_cir.main(["--model_name_or_path", str(tiny_model_dir), "--do_eval", "--output_dir", str(tmp_path / "e"),
                      "--eval_datasets", entry, "--use_cpu", "--metric_for_best_model", "average"])
    collection = tmp_path / "collection"
    from datasets_scripts.images import build_images

    photos = tmp_path / "photos"
    write_png(photos / "a.png", 0)
    build_images(photos, collection)
    with pytest.raises(ValueError, match=r"--train_dataset .*collection: it has no 'train' triplets .*image "
                                         r"collection: caption and pair it first"):
        run_cir.main(["--model_name_or_path", str(tiny_model_dir), "--do_train", "--output_dir", str(tmp_path / "t"),
                      "--train_dataset", str(collection), "--use_cpu"])


def test_the_checkpoint_is_chosen_by_the_named_metric_of_one_eval_dataset(tiny_cir_dataset, cirr_root,
                                                                          tiny_vit_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPN4CIR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    results = run_cir.main([
        "--model_name_or_path", str(tiny_vit_dir), "--dataset", str(tiny_cir_dataset), "--do_train", "--do_eval",
        "--eval_datasets", f"cirr={cirr_root}", f"mine={tiny_cir_dataset}", "--metric_for_best_model",
        "mine_recall@1", "--load_best_model_at_end", "true", "--eval_strategy", "epoch", "--save_strategy", "epoch",
        "--num_train_epochs", "2", "--learning_rate", "5e-3", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "16", "--output_dir", str(out), "--report_to", "none", "--use_cpu",
        "--disable_tqdm", "true"])
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    history = [log["eval_mine_recall@1"] for log in state["log_history"] if "eval_mine_recall@1" in log]
    assert len(history) == 2 and {"eval_cirr_average", "eval_mine_recall@10"} <= set(results)
    assert state["best_metric"] == max(history) == results["eval_mine_recall@1"]  # the best epoch, reloaded
    assert results["train_datasets"] == [str(tiny_cir_dataset)] and results["train_triplets"] == 16
