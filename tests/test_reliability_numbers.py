"""Issue 20 (part B): never a good-looking number from bad data, and every error names its culprit.

One test per class (the metrics' own are in test_evaluation.py): a diverging run (stops naming the step, no
NaN weights saved), resume (refused without optimizer state; whole-run train_loss), the converter (NaN weights
refused with the key), positive scaling (empty captions, k=0, stale caption cache), a truncated model file and a
batch larger than the dataset (messages name the path / the sizes)."""

import json
import shutil

import datasets
import pytest
import torch
from conftest import run_two_processes
from transformers import TrainerCallback

from modeling_spn4cir.loading import load_cir_model_and_processor
from trainers.cir_trainer import CIRTrainer, CIRTrainingArguments


# ------------------------------------------------------------------------------------------ training
def _args(out, **kw):
    base = dict(output_dir=str(out), stage="in_batch", per_device_train_batch_size=4, num_train_epochs=1,
                logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
                learning_rate=1e-3)
    base.update(kw)
    return CIRTrainingArguments(**base)


@pytest.fixture
def tiny_training(tiny_cir_dataset, tiny_model_dir):
    train = datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="train")
    corpus = datasets.load_dataset(str(tiny_cir_dataset), "corpus", split="train")

    def make(out, **kw):
        model, processor = load_cir_model_and_processor(str(tiny_model_dir))
        return CIRTrainer(model, _args(out, **kw), train_dataset=train, corpus=corpus, processor=processor)

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


# ----------------------------------------------------------------------------------------- converter
def test_converter_refuses_nan_weights_naming_the_key_unless_allowed(tmp_path, caplog):
    from conftest import FIXTURES

    from modeling_spn4cir.conversion_utils import NonFiniteWeightsError
    from modeling_spn4cir.convert_original_checkpoint import main

    data = torch.load(FIXTURES / "parity_clip4cir" / "spn4cir_clip4cir_vit_stage2.pt", weights_only=True)
    data["state_dict"]["clip.text_projection"][0, 0] = float("nan")
    path = tmp_path / "diverged.pt"
    torch.save(data, path)
    with pytest.raises(NonFiniteWeightsError, match=r"text_projection.*--allow_nonfinite_weights"):
        main(["--checkpoint", str(path), "--output_dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()
    with caplog.at_level("WARNING"):
        main(["--checkpoint", str(path), "--output_dir", str(tmp_path / "allowed"), "--allow_nonfinite_weights"])
    assert (tmp_path / "allowed" / "model.safetensors").exists()
    assert "text_projection" in caplog.text and "converting anyway" in caplog.text
    # the family's own converter CLI, which the error's advice also applies to, takes the same flag
    from modeling_spn4cir.clip4cir.convert_clip4cir_original_checkpoint import main as family_main

    with pytest.raises(NonFiniteWeightsError, match="text_projection"):
        family_main(["--checkpoint", str(path), "--output_dir", str(tmp_path / "family_refused")])
    family_main(["--checkpoint", str(path), "--output_dir", str(tmp_path / "family"), "--allow_nonfinite_weights"])
    assert (tmp_path / "family" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------- positive scaling
def _scaling_corpus(ids, colours):
    from PIL import Image

    return datasets.Dataset.from_dict(
        {"image_id": list(ids), "image": [Image.new("RGB", (8, 8), c) for c in colours]},
        features=datasets.Features({"image_id": datasets.Value("string"), "image": datasets.Image()}))


class _PixelCaptioner:
    """Captions an image by its colour and records which ids it was asked to caption."""

    def __init__(self):
        self.seen = []

    def __call__(self, batch):
        self.seen += batch["image_id"]
        return [f"a {image.getpixel((0, 0))} square" for image in batch["image"]]


def test_positive_scaling_refuses_empty_captions_and_k0_and_never_reuses_stale_captions(tmp_path):
    from datasets_scripts.captioners import ColumnCaptioner
    from datasets_scripts.captioning import caption_corpus
    from datasets_scripts.positive_scaling import generate_scaled_triplets

    ids = [f"g{i:02d}" for i in range(12)]
    corpus = _scaling_corpus(ids, [(i * 20, 0, 0) for i in range(12)])
    mapping = {i: f"caption of {i}" for i in ids} | {"g03": "  "}
    common = dict(rank_window=None, dataset="cirr", show_progress_bar=False)
    with pytest.raises(ValueError, match=r"empty caption for 1 of 12 images \(first: \['g03'\]\).*skip_empty_captions"):
        generate_scaled_triplets(corpus, ColumnCaptioner(mapping=mapping), tmp_path / "refused", **common)
    out = generate_scaled_triplets(corpus, ColumnCaptioner(mapping=mapping), tmp_path / "skipped",
                                   skip_empty_captions=True, **common).path
    triplets = datasets.load_dataset(str(out), "triplets", split="train").to_list()
    assert len(triplets) == 11 and all("g03" not in (t["reference_id"], t["target_id"]) for t in triplets)
    assert all(t.count("caption of g") == 2 for row in triplets for t in row["modification_texts"])  # both captions
    with pytest.raises(ValueError, match="k .* must be a positive integer, got 0"):
        generate_scaled_triplets(corpus, ColumnCaptioner(mapping=mapping), tmp_path / "k0", k=0, **common)
    assert not (tmp_path / "k0").exists()

    # The cache is keyed by each image's id and content: a changed image and a renamed middle id are captioned
    # again (only they are), never served the old caption.
    first = _PixelCaptioner()
    captions = caption_corpus(corpus, first, tmp_path / "cache", shard_size=4, show_progress_bar=False)
    assert sorted(first.seen) == ids and captions["g05"] == "a (100, 0, 0) square"
    colours = [(i * 20, 0, 0) for i in range(12)]
    colours[5] = (0, 0, 255)
    renamed = [("h06" if i == "g06" else i) for i in ids]
    again = _PixelCaptioner()
    captions = caption_corpus(_scaling_corpus(renamed, colours), again, tmp_path / "cache", shard_size=4,
                              show_progress_bar=False)
    assert sorted(again.seen) == ["g05", "h06"]
    assert captions["g05"] == "a (0, 0, 255) square" and captions["h06"] == "a (120, 0, 0) square"
    assert "g06" not in captions and len(captions) == 12


# ------------------------------------------------------------------------------- errors naming the file
def test_truncated_model_file_is_named_with_the_fix(tiny_model_dir):
    weights = tiny_model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match=rf"Cannot read {weights}:.*truncated.*re-download.*re-convert"):
        load_cir_model_and_processor(str(tiny_model_dir))
