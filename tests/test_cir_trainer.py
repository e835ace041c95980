"""CIRTrainer: stage-2 isolation (frozen tower, no image processing, optimizer scope), resume, run_cir.py."""

import json
from pathlib import Path

import datasets
import pytest
import run_cir
import torch
from safetensors.torch import load_file

from modeling_spn4cir.loading import load_cir_model_and_processor
from trainers.cir_trainer import CIRTrainer, CIRTrainingArguments
from trainers.evaluation import CIREvaluator


def _args(tmp_path, stage, **kw):
    base = dict(output_dir=str(tmp_path / stage), stage=stage, per_device_train_batch_size=4, num_train_epochs=1,
                logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
                learning_rate=1e-3)
    base.update(kw)
    return CIRTrainingArguments(**base)


class CountingProcessor:
    """Wraps an image processor and counts calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.inner(*a, **k)

    def to_json_string(self):
        return self.inner.to_json_string()


def test_stage2_trains_only_the_query_side(tiny_cir_dataset, tiny_model_dir, tmp_path):
    model, processor = load_cir_model_and_processor(str(tiny_model_dir))
    train = datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="train")
    corpus = datasets.load_dataset(str(tiny_cir_dataset), "corpus", split="train")
    counting = CountingProcessor(processor.image_processor)
    processor.image_processor = counting
    vision_before = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    text_before = model.text_projection.weight.clone()
    trainer = CIRTrainer(model, _args(tmp_path, "candidate_bank"), train_dataset=train, corpus=corpus,
                         processor=processor)
    assert counting.calls > 0  # the bank was built with it...
    counting.calls = 0
    trainer.train()
    assert counting.calls == 0  # ...and training never touched an image
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.query_side_parameters()}
    for k, v in model.vision_model.state_dict().items():
        assert torch.equal(v, vision_before[k]), k
    assert not torch.equal(model.text_projection.weight, text_before)
    assert len(trainer.bank) == len(set(train["reference_id"]) | set(train["target_id"]))


def test_image_cache_decodes_each_image_once_and_trains_identically(tiny_cir_dataset, tiny_model_dir, tmp_path,
                                                                     monkeypatch):
    from modeling_spn4cir.image_store import ImageStore

    decoded = []
    real_images = ImageStore.images
    monkeypatch.setattr(ImageStore, "images", lambda self, ids: decoded.extend(ids) or real_images(self, ids))
    train = datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="train")
    corpus = datasets.load_dataset(str(tiny_cir_dataset), "corpus", split="train")
    weights, reads = {}, {}
    for cache in (False, True):
        decoded.clear()
        model, processor = load_cir_model_and_processor(str(tiny_model_dir))
        trainer = CIRTrainer(model, _args(tmp_path / str(cache), "in_batch", num_train_epochs=3, cache_images=cache),
                             train_dataset=train, corpus=corpus, processor=processor)
        trainer.train()
        weights[cache], reads[cache] = model.state_dict(), list(decoded)
    used = set(train["reference_id"]) | set(train["target_id"])
    assert len(reads[False]) == 3 * 2 * len(train)  # every epoch decodes every reference and target again
    assert sorted(reads[True]) == sorted(used)  # the cache: each image once, in the first epoch
    for name, value in weights[False].items():
        assert torch.equal(value, weights[True][name]), name  # the same batches, so the same weights


def _losses(trainer):
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def test_resume_from_checkpoint_continues_identically(tiny_cir_dataset, tiny_model_dir, tmp_path):
    train = datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="train")
    corpus = datasets.load_dataset(str(tiny_cir_dataset), "corpus", split="train")
    # two captions per triplet joined at random (FashionIQ style): the collator's randomness must resume too
    train = train.map(lambda r: {"modification_texts": r["modification_texts"] + ["and more"]})

    def trainer_for(out):
        model, processor = load_cir_model_and_processor(str(tiny_model_dir))
        args = _args(tmp_path, "in_batch", output_dir=str(out), save_strategy="steps", save_steps=2, max_steps=4)
        return CIRTrainer(model, args, train_dataset=train, corpus=corpus, processor=processor,
                          join_annotated_captions=True)

    full = trainer_for(tmp_path / "full")
    full.train()
    resumed = trainer_for(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert len(_losses(full)) == 4
    assert _losses(resumed)[-2:] == _losses(full)[-2:]
    card = (tmp_path / "full" / "checkpoint-4" / "README.md").read_text()
    assert "stage 1 (in-batch InfoNCE)" in card
    full.create_model_card(model_name="ignored")  # what push_to_hub calls before uploading
    assert "stage 1 (in-batch InfoNCE)" in (tmp_path / "full" / "README.md").read_text()
    assert (tmp_path / "full" / "checkpoint-4" / "preprocessor_config.json").exists() or \
        (tmp_path / "full" / "checkpoint-4" / "processor_config.json").exists()


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


def test_stage2_gradient_accumulation_2x4_equals_batch_8(tiny_cir_dataset, tiny_model_dir, tmp_path):
    train = datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="train")
    corpus = datasets.load_dataset(str(tiny_cir_dataset), "corpus", split="train")
    weights = []
    for batch, accumulation in ((8, 1), (4, 2)):
        model, processor = load_cir_model_and_processor(str(tiny_model_dir))
        args = _args(tmp_path, "candidate_bank", output_dir=str(tmp_path / f"acc{accumulation}"), max_steps=1,
                     per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, optim="sgd",
                     learning_rate=0.5, bank_dir=str(tmp_path / "bank"))
        CIRTrainer(model, args, train_dataset=train, corpus=corpus, processor=processor).train()
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    start, _ = load_cir_model_and_processor(str(tiny_model_dir))
    assert not torch.equal(weights[0]["text_projection.weight"], start.state_dict()["text_projection.weight"])
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], atol=1e-6, rtol=1e-5, msg=k)


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
