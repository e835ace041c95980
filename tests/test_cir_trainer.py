"""CIRTrainer: stage-2 isolation (frozen tower, no image processing, optimizer scope), resume, run_cir.py."""

import json
import shutil

import datasets
import pytest
import torch
from conftest import run_two_processes
from ddp_grouped_stage2 import train_grouped_stage2, varied_texts
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


# ------------------------------------------------------------------------------- output directory and resume
def test_a_second_training_into_the_same_output_dir_is_refused_naming_it_and_the_holder(tiny_training, tmp_path):
    from conftest import lock_held_elsewhere

    from modeling_spn4cir.storage import OutputLockedError

    out = tmp_path / "run"
    trainer = tiny_training(out, max_steps=1)
    with lock_held_elsewhere(out) as pid, pytest.raises(  # another training writing `out`
            OutputLockedError, match=rf"Cannot use {out} for this training output: .*pid {pid}"):
        trainer.train()
    assert not out.exists() or not any(out.iterdir())  # the refused run wrote nothing there
    assert trainer.train().global_step == 1  # once the other run is done, it trains
    # a new run into a directory with an earlier run's checkpoints would mix them (rotation, resume): refused
    tiny_training(out, max_steps=2, save_strategy="steps", save_steps=2).train()
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(checkpoint-2\).*--resume_from_checkpoint"):
        tiny_training(out, max_steps=2).train()


def test_an_interrupted_checkpoint_save_is_never_resumed(tiny_training, tmp_path, monkeypatch, caplog):
    from transformers import Trainer

    from trainers.checkpoints import RUN_RECORD

    out = tmp_path / "run"
    real = Trainer._save_rng_state

    def ctrl_c_in_the_second_save(self, output_dir):
        if str(output_dir).endswith("checkpoint-4"):
            raise KeyboardInterrupt  # the weights are written, the rest of the save is not
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", ctrl_c_in_the_second_save)
    with pytest.raises(KeyboardInterrupt):
        tiny_training(out, save_strategy="steps", save_steps=2, max_steps=4).train()
    monkeypatch.undo()
    half = out / "checkpoint-4"
    assert (half / "model.safetensors").exists() and not (half / RUN_RECORD).exists()
    assert (out / "checkpoint-2" / RUN_RECORD).exists()
    with pytest.raises(ValueError, match=r"checkpoint-4 has no spn4cir_run.json.*interrupted.*newest complete one is "
                                         r".*checkpoint-2"):
        tiny_training(out, max_steps=4).train(resume_from_checkpoint=str(half))
    with caplog.at_level("WARNING", logger="trainers.checkpoints"):
        resumed = tiny_training(out, save_strategy="steps", save_steps=2, max_steps=4)
        assert resumed.train(resume_from_checkpoint=True).global_step == 4  # from checkpoint-2
    assert "Skipping" in caplog.text and "checkpoint-4" in caplog.text
    assert (half / RUN_RECORD).exists()  # steps 3-4 again, then saved whole


def test_resuming_with_other_settings_names_what_differs(tiny_cir_dataset, tiny_model_dir, tmp_path):
    train = datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="train")
    corpus = datasets.load_dataset(str(tiny_cir_dataset), "corpus", split="train")

    def trainer(stage, **kw):
        model, processor = load_cir_model_and_processor(str(tiny_model_dir))
        args = _args(tmp_path, stage, output_dir=str(tmp_path / kw.pop("out", "other")), **{"max_steps": 2, **kw})
        return CIRTrainer(model, args, train_dataset=train, corpus=corpus, processor=processor)

    trainer("in_batch", out="stage1", save_strategy="steps", save_steps=2).train()
    checkpoint = str(tmp_path / "stage1" / "checkpoint-2")
    with pytest.raises(ValueError, match=r"Cannot resume from .*checkpoint-2: it was saved by a run with other "
                                         r"settings \(--stage: the checkpoint has 'in_batch', this run "
                                         r"'candidate_bank'\)"):
        trainer("candidate_bank").train(resume_from_checkpoint=checkpoint)
    with pytest.raises(ValueError, match=r"the LoRA options \(--lora_\*\): the checkpoint has None, this run \{'r': 4"):
        trainer("in_batch", lora_r=4).train(resume_from_checkpoint=checkpoint)
    assert trainer("in_batch", max_steps=3).train(resume_from_checkpoint=checkpoint).global_step == 3  # same: resumes
class _RowLosses:
    """Records the rows of each batch (from the collator) and, with `losses`, every row's own loss (the trainer's loss
    module on that query alone)."""

    def __init__(self, trainer, losses: bool = True):
        self.trainer, self.collate, self.loss_fn = trainer, trainer.data_collator, trainer.loss_fn
        self.rows, self.losses, self.widths = [], [], []
        trainer.data_collator = self._collate
        if losses:
            trainer.loss_fn = self._loss

    def _collate(self, rows):
        batch = self.collate(rows)
        self.rows += [r["row_index"] for r in rows]
        self.widths.append(batch["input_ids"].shape[1])
        return batch

    def _loss(self, query_embeds, target_index, temperature=None):
        self.losses += [self.loss_fn(q[None], t[None], temperature).item() for q, t in zip(query_embeds, target_index)]
        return self.loss_fn(query_embeds, target_index, temperature)

    def by_row(self) -> dict[int, float]:
        return dict(zip(self.rows, self.losses))


def test_stage2_grouped_batches_give_every_query_the_loss_it_has_in_random_batches(tiny_cir_dataset, tiny_model_dir,
                                                                                      tmp_path):
    """For fixed weights (lr 0) each query's loss is the same whichever rows share its batch: only the batches (and
    so the padding, and the order of updates) change."""
    train = varied_texts(datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="train"))
    corpus = datasets.load_dataset(str(tiny_cir_dataset), "corpus", split="train")
    runs = {}
    for grouped in (False, True):
        model, processor = load_cir_model_and_processor(str(tiny_model_dir))
        args = _args(tmp_path / str(grouped), "candidate_bank", learning_rate=0.0, num_train_epochs=2,
                     group_by_text_length=grouped, length_groups_per_bucket=4, bank_dir=str(tmp_path / "bank"))
        trainer = CIRTrainer(model, args, train_dataset=train, corpus=corpus, processor=processor,
                             join_annotated_captions=True)
        runs[grouped] = _RowLosses(trainer)
        trainer.train()
    random_order, grouped = runs[False], runs[True]
    assert sorted(grouped.rows) == sorted(random_order.rows) == sorted(2 * list(range(len(train))))
    assert grouped.rows != random_order.rows and sum(grouped.widths) < sum(random_order.widths)
    for epoch in range(2):  # each epoch draws each row's text anew, the same in both runs
        half = slice(epoch * len(train), (epoch + 1) * len(train))
        a = dict(zip(random_order.rows[half], random_order.losses[half]))
        b = dict(zip(grouped.rows[half], grouped.losses[half]))
        assert a.keys() == b.keys()
        for row, loss in a.items():
            assert b[row] == pytest.approx(loss, abs=1e-5, rel=1e-5), (epoch, row)


def test_length_grouping_is_asked_for_and_refused_where_it_would_change_the_negatives(tmp_path):
    # off by default: random batches, as the original (it changes which rows share an update: docs/training.md)
    assert not _args(tmp_path, "candidate_bank").group_by_text_length
    assert not _args(tmp_path, "in_batch").group_by_text_length
    assert _args(tmp_path, "candidate_bank", group_by_text_length=True).group_by_text_length
    with pytest.raises(ValueError, match="stage-2 option: in stage 1 the batch is each query's negatives"):
        _args(tmp_path, "in_batch", group_by_text_length=True)
    with pytest.raises(ValueError, match="--train_sampling_strategy sequential and --group_by_text_length"):
        _args(tmp_path, "candidate_bank", train_sampling_strategy="sequential", group_by_text_length=True)
    assert not _args(tmp_path, "candidate_bank", train_sampling_strategy="sequential").group_by_text_length


def test_stage2_groups_whole_updates(tiny_cir_dataset, tiny_model_dir, tmp_path):
    """The order's unit is one optimizer update (batch x processes x accumulation), and it reads the tokenized texts'
    lengths: the texts were tokenized once, at construction."""
    from trainers.length_groups import LengthGroupedOrder

    train = datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="train")
    corpus = datasets.load_dataset(str(tiny_cir_dataset), "corpus", split="train")
    model, processor = load_cir_model_and_processor(str(tiny_model_dir))
    trainer = CIRTrainer(model, _args(tmp_path, "candidate_bank", per_device_train_batch_size=2,
                                      gradient_accumulation_steps=3, group_by_text_length=True),
                         train_dataset=train, corpus=corpus,
                         processor=processor)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedOrder) and sampler.group_size == 6 and sampler.seed == 0
    assert len(trainer.training_texts) == len(train)
    assert trainer.training_texts.row_lengths(0).tolist() == [
        len(processor.tokenizer(t[0])["input_ids"]) for t in train["modification_texts"]]
    numbered = train.add_column("row_index", list(range(len(train)))[::-1])
    with pytest.raises(ValueError, match="row_index column that does not number them 0..n-1"):
        CIRTrainer(model, _args(tmp_path, "candidate_bank"), train_dataset=numbered, corpus=corpus,
                   processor=processor, bank=trainer.bank)


@pytest.mark.slow
def test_stage2_grouped_batches_train_the_same_updates_on_two_processes_with_accumulation(tiny_cir_dataset,
                                                                                           tiny_model_dir, tmp_path):
    """2 processes x batch 2 x 2 accumulation steps = one process x batch 8: the grouped order's updates hold the same
    rows whatever the split, so two SGD updates give the same weights."""
    run_two_processes("ddp_grouped_stage2.py", tiny_model_dir, tiny_cir_dataset, tmp_path / "ddp")
    ddp = torch.load(tmp_path / "ddp" / "ddp.pt", weights_only=True)
    single = train_grouped_stage2(tiny_model_dir, tiny_cir_dataset, tmp_path / "single", batch=8, accumulation=1)
    start, _ = load_cir_model_and_processor(str(tiny_model_dir))
    assert not torch.equal(single["text_projection.weight"], start.text_projection.weight)
    assert ddp.keys() == single.keys()
    for name, weight in single.items():
        torch.testing.assert_close(ddp[name], weight, atol=1e-6, rtol=1e-5, msg=name)


def test_stage2_grouped_order_resumes_mid_epoch_identically(tiny_cir_dataset, tiny_model_dir, tmp_path):
    """Resumed in the middle of the second epoch, the grouped order (and each row's text) continues as without the
    interruption: the order is a function of the seed and the epoch, which the resumed dataloader's sampler is told."""
    train = varied_texts(datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="train"))
    corpus = datasets.load_dataset(str(tiny_cir_dataset), "corpus", split="train")

    def trainer_for(out):
        model, processor = load_cir_model_and_processor(str(tiny_model_dir))
        args = _args(tmp_path, "candidate_bank", output_dir=str(out), save_strategy="steps", save_steps=6,
                     num_train_epochs=2, group_by_text_length=True, length_groups_per_bucket=2,
                     bank_dir=str(tmp_path / "bank"))
        return CIRTrainer(model, args, train_dataset=train, corpus=corpus, processor=processor,
                          join_annotated_captions=True)

    full = trainer_for(tmp_path / "full")
    rows = _RowLosses(full, losses=False)
    full.train()
    resumed = trainer_for(tmp_path / "resumed")
    rows_resumed = _RowLosses(resumed, losses=False)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    assert len(_losses(full)) == 8 and resumed.state.global_step == 8
    assert _losses(resumed)[-2:] == pytest.approx(_losses(full)[-2:], abs=1e-6)  # steps 7 and 8, after the resume
    assert rows.rows[:16] != rows.rows[16:] and sorted(rows.rows[:16]) == sorted(rows.rows[16:])  # a new order
    assert rows_resumed.rows[-8:] == rows.rows[-8:]  # the resumed dataloader's last two batches: the same rows


def test_stage2_from_a_given_bank_needs_no_corpus_and_checks_ids_against_the_bank(tiny_cir_dataset, tiny_model_dir,
                                                                                 tmp_path):
    """A stage-2 trainer handed a bank reads reference features and targets from it: no image is needed, and a
    triplet naming an image the bank does not hold is refused when the trainer is built."""
    train = datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="train")
    corpus = datasets.load_dataset(str(tiny_cir_dataset), "corpus", split="train")
    model, processor = load_cir_model_and_processor(str(tiny_model_dir))
    bank = CIRTrainer(model, _args(tmp_path / "a", "candidate_bank"), train_dataset=train, corpus=corpus,
                      processor=processor).bank
    trainer = CIRTrainer(model, _args(tmp_path / "b", "candidate_bank", max_steps=1), train_dataset=train,
                         processor=processor, bank=bank)
    trainer.train()
    ghost = train.map(lambda row, i: {"reference_id": "ghost" if i == 1 else row["reference_id"]}, with_indices=True)
    with pytest.raises(ValueError, match="triplet 1 .*reference 'ghost'.* names a reference image the corpus does not"):
        CIRTrainer(model, _args(tmp_path / "c", "candidate_bank"), train_dataset=ghost, processor=processor,
                   bank=bank)
