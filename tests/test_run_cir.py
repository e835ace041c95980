"""`examples/run_cir.py`, the training / evaluation CLI: both stages end to end, JSON configs (the paper's settings,
each loading and running on a tiny official-layout benchmark), overrides, unknown keys and `--help`."""

import json
from pathlib import Path

import datasets
import pytest
import run_cir
import torch
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
    card = (out / "README.md").read_text()
    assert "Metrics" in card and "eval_recall@10" in card and "reference removed" in card


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
    for training_flag in ("--model_name_or_path", "--dataset", "--stage", "--bank_dir", "--num_negatives",
                          "--learning_rate"):
        assert training_flag in text
    assert "without `--dataset`" in text and "--oracle_captions" in text and "--size" in text


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
    assert args.stage == "candidate_bank" and args.adam_epsilon == 1e-7 and args.weight_decay == 0.01
    assert args.lr_scheduler_type == "constant" and args.dataloader_drop_last and args.seed == 42
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
