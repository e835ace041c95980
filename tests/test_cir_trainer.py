"""CIRTrainer: stage-2 isolation (frozen tower, no image processing, optimizer scope), resume, run_cir.py."""

import json
import shutil

import datasets
import pytest
import torch
from conftest import run_two_processes
from transformers import TrainerCallback

from modeling_spn4cir.loading import load_cir_model_and_processor
from trainers.cir_trainer import CIRTrainer, CIRTrainingArguments


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


@pytest.fixture
def tiny_training(tiny_cir_dataset, tiny_model_dir):
    train = datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="train")
    corpus = datasets.load_dataset(str(tiny_cir_dataset), "corpus", split="train")

    def make(out, **kw):
        model, processor = load_cir_model_and_processor(str(tiny_model_dir))
        return CIRTrainer(model, _args(out, "in_batch", output_dir=str(out), **kw), train_dataset=train,
                          corpus=corpus, processor=processor)

    return make


class _PoisonAfter(TrainerCallback):
    """Make the model diverge after `step`: one weight becomes NaN (what lr=1e6 does, deterministically)."""

    def __init__(self, model, step):
        self.model, self.step = model, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                self.model.text_projection.weight[0, 0] = float("nan")


def test_diverging_run_stops_naming_the_step_and_never_saves_nan_weights(tiny_training, tmp_path):
    trainer = tiny_training(tmp_path / "run")
    trainer.add_callback(_PoisonAfter(trainer.model, 2))
    with pytest.raises(RuntimeError, match="Training loss is nan at step 3"):
        trainer.train()
    with pytest.raises(RuntimeError, match="weight 'text_projection.weight' contains NaN"):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / "model.safetensors").exists()
    # The case: lr 1e6 used to log loss 0 and save NaN weights; it stops at the first NaN, before its update.
    diverging = tiny_training(tmp_path / "lr", learning_rate=1e6, num_train_epochs=5)
    with pytest.raises(RuntimeError, match=r"Training loss is (nan|inf) at step \d+"):
        diverging.train()
    assert all(torch.isfinite(p).all() for p in diverging.model.parameters())


@pytest.mark.slow
def test_nan_loss_on_one_rank_stops_every_rank_together(tiny_cir_dataset, tiny_model_dir, tmp_path):
    """Only rank 0's loss is NaN (from step 2): DDP has averaged its NaN gradients into rank 1's, so both ranks
    must drop step 2 and both must stop at step 3 — neither steps with NaN weights nor waits for the other."""
    run_two_processes("ddp_nonfinite.py", tiny_model_dir, tiny_cir_dataset, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, record in enumerate(ranks):
        assert record["outcome"].startswith("Training loss is"), record
        assert f"on rank {rank} (non-finite on at least one rank) at step 3" in record["outcome"]
        assert record["finite"] and record["step1_applied"] and record["step2_dropped"], (rank, record)
    assert "loss is nan" in ranks[0]["outcome"] and "loss is nan" not in ranks[1]["outcome"]  # rank 1's was finite


def test_resume_refuses_a_checkpoint_without_optimizer_state_and_reports_the_whole_runs_loss(tiny_training, tmp_path):
    full = tiny_training(tmp_path / "full", save_strategy="steps", save_steps=2, max_steps=4)
    whole = full.train().training_loss
    # Resumed from step 2, the reported train_loss is the mean over all 4 steps, as in the uninterrupted run.
    resumed = tiny_training(tmp_path / "resumed", save_strategy="steps", save_steps=2, max_steps=4)
    output = resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert output.training_loss == pytest.approx(whole, rel=1e-6)
    assert resumed.state.log_history[-1]["train_loss"] == pytest.approx(whole, rel=1e-6)

    partial = tmp_path / "partial"
    shutil.copytree(tmp_path / "full" / "checkpoint-2", partial)
    (partial / "optimizer.pt").unlink()
    refused = tiny_training(tmp_path / "refused", max_steps=4)
    with pytest.raises(ValueError, match=r"has no optimizer.pt.*--resume_without_optimizer_state"):
        refused.train(resume_from_checkpoint=str(partial))
    allowed = tiny_training(tmp_path / "allowed", max_steps=4, resume_without_optimizer_state=True)
    assert allowed.train(resume_from_checkpoint=str(partial)).global_step == 4


def test_batch_larger_than_the_dataset_with_drop_last_names_the_sizes(tiny_training, tmp_path):
    trainer = tiny_training(tmp_path / "run", per_device_train_batch_size=32, dataloader_drop_last=True)
    with pytest.raises(ValueError, match=r"16 triplets but one batch takes 32.*at most 16"):
        trainer.train()
