"""Model cards as the Hub reads them (`modeling_spn4cir.model_cards`, `trainers.model_card`): a card pushed with
`push_to_hub` parses with `ModelCard.load` and its `model-index` holds the last evaluation (named split and protocol);
`run_cir.py --do_eval` writes the card after the evaluation; `base_model` is a Hub id, never a local path; the usage
snippet runs as written."""

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from huggingface_hub import ModelCard

from datasets_scripts.common import TRIPLET_FEATURES
from modeling_spn4cir.loading import load_cir_model_and_processor
from modeling_spn4cir.model_cards import PIPELINE_TAG, hub_base_model, hub_dataset_id
from trainers.cir_trainer import CIRTrainer, CIRTrainingArguments
from trainers.evaluation import CIREvaluator
from trainers.model_card import logged_evaluation, run_info

HUB_BASE = "openai/clip-vit-base-patch32"


def _index(card: ModelCard) -> dict:
    """`{metric: (value, split, protocol)}` of a card's `model-index`."""
    return {r.metric_type: (r.metric_value, r.dataset_split, r.metric_config) for r in card.data.eval_results}


class RecordingHfApi:
    """What `Trainer.push_to_hub` asks of the Hub: the repo it creates and the folder it uploads (README.md kept)."""

    def __init__(self):
        self.repos, self.readme = [], None

    def create_repo(self, repo_id, token=None, private=None, exist_ok=False, **kwargs):
        self.repos.append(repo_id)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, **kwargs):
        self.uploaded_to = repo_id
        self.readme = (Path(folder_path) / "README.md").read_text()
        return SimpleNamespace(oid="0" * 40)


def test_push_to_hub_publishes_the_card_of_the_last_evaluation(tiny_cir_dataset, tiny_model_dir, tmp_path,
                                                              monkeypatch):
    # a stage-1 model trained here from a Hub model: its card names that model, which the next stage inherits
    stage1 = tmp_path / "stage1"
    shutil.copytree(tiny_model_dir, stage1)
    (stage1 / "README.md").write_text(f"---\nbase_model: {HUB_BASE}\n---\n# stage 1\n")
    model, processor = load_cir_model_and_processor(str(stage1))
    corpus = datasets.load_dataset(str(tiny_cir_dataset), "corpus")
    triplets = datasets.load_dataset(str(tiny_cir_dataset), "triplets")
    evaluator = CIREvaluator(corpus["val"], triplets["val"], processor.image_processor, processor,
                             show_progress_bar=False)
    args = CIRTrainingArguments(output_dir=str(tmp_path / "out"), stage="candidate_bank", max_steps=2,
                                per_device_train_batch_size=4, eval_strategy="steps", eval_steps=2, save_strategy="no",
                                report_to=[], use_cpu=True, disable_tqdm=True, bank_dir=str(tmp_path / "bank"),
                                hub_model_id="me/tiny-cir")
    trainer = CIRTrainer(model, args, train_dataset=triplets["train"].select_columns(list(TRIPLET_FEATURES)),
                         corpus=corpus["train"], processor=processor, evaluator=evaluator,
                         model_card_info=run_info(str(stage1), str(tiny_cir_dataset), "train", "val", license="mit"))
    trainer.train()
    trainer.save_model()
    during_training = logged_evaluation(trainer.state.log_history)
    with torch.no_grad():  # new weights, so that the last evaluation differs from the one logged while training
        torch.manual_seed(0)
        for p in model.text_projection.parameters():
            p.add_(torch.randn_like(p))
    last = {k[len("eval_"):]: v for k, v in trainer.evaluate().items() if k.startswith("eval_") and k != "eval_epoch"}
    assert last != during_training
    expected = {k: (round(v, 4), "val", "recall") for k, v in last.items()}
    assert _index(ModelCard.load(tmp_path / "out" / "README.md")) == expected  # evaluate() rewrote the card

    api = RecordingHfApi()
    monkeypatch.setattr("transformers.trainer.hf_api", lambda: api)
    trainer.push_to_hub()
    assert api.repos == ["me/tiny-cir"] and api.uploaded_to == "me/tiny-cir"
    (tmp_path / "pushed.md").write_text(api.readme)
    card = ModelCard.load(tmp_path / "pushed.md")
    assert _index(card) == expected
    result = card.data.eval_results[0]
    assert (result.task_type, result.task_name, result.dataset_name) == (PIPELINE_TAG, "Composed Image Retrieval",
                                                                         "tiny_cir")
    assert result.metric_name == f"{result.metric_type}, recall protocol"
    data = card.data
    assert (data.base_model, data.license, data.pipeline_tag, data.library_name) == (HUB_BASE, "mit", PIPELINE_TAG,
                                                                                    "transformers")
    assert {"composed-image-retrieval", "clip4cir", "stage-2"} <= set(data.tags)
    assert "stage 2 (candidate-bank InfoNCE)" in card.text and "| candidate bank | " in card.text
    assert f"| recall@10 | {last['recall@10']:.2f} |" in card.text and "split `val`" in card.text
    assert 'model="me/tiny-cir"' in card.text and str(tmp_path) not in api.readme  # no local path anywhere


def _usage(card_text: str) -> str:
    return re.search(r"## Usage\n\n```python\n(.*?)\n```", card_text, flags=re.DOTALL).group(1)


def test_run_cir_writes_the_card_after_the_evaluation_and_its_usage_runs(tiny_cir_dataset, tiny_model_dir,
                                                                          image_dir, tmp_path, monkeypatch, capsys):
    import run_cir

    out = tmp_path / "stage1"
    results = run_cir.main([
        "--model_name_or_path", str(tiny_model_dir), "--dataset", str(tiny_cir_dataset), "--do_train", "--do_eval",
        "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_steps", "2", "--report_to", "none",
        "--use_cpu", "--disable_tqdm", "true", "--save_strategy", "no",  # evaluated once, after training
    ])
    text = (out / "README.md").read_text()
    card = ModelCard.load(out / "README.md")
    assert _index(card) == {k: (round(results[f"eval_{k}"], 4), "val", "recall")
                            for k in ("recall@1", "recall@5", "recall@10", "recall@50")}
    assert json.loads((out / "all_results.json").read_text())["eval_recall@10"] == results["eval_recall@10"]
    assert card.data.base_model is None and card.data.license == "unknown"  # a local base: no Hub id to name
    assert "| base model | a local checkpoint (not on the Hub) |" in text and str(tmp_path) not in text
    # the snippet runs as written next to the output directory, with a folder of images and a query image
    shutil.copytree(image_dir, tmp_path / "my_images")
    shutil.copy(image_dir / "im01.png", tmp_path / "query.jpg")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(_usage(text), {})  # noqa: S102 (the card's own snippet, run as a user would)
    hits = capsys.readouterr().out
    assert hits.count("'image_id'") == 5 and "'score'" in hits


def test_base_model_is_a_hub_id_never_a_local_path(tmp_path):
    assert hub_base_model(HUB_BASE) == HUB_BASE  # loaded from the Hub: not a local path
    snapshot = tmp_path / "hub" / "models--openai--clip-vit-base-patch32" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert hub_base_model(snapshot) == HUB_BASE  # a snapshot in the Hugging Face cache
    trained_here = tmp_path / "stage1"
    trained_here.mkdir()
    assert hub_base_model(trained_here) is None  # a local checkpoint of unknown origin
    (trained_here / "README.md").write_text(f"---\nbase_model: {HUB_BASE}\n---\n")
    assert hub_base_model(trained_here) == HUB_BASE  # the Hub model its card says it was trained from
    assert hub_base_model(tmp_path / "gone" / "model") is None and hub_base_model(None) is None
    assert hub_dataset_id("me/scaled-triplets") == "me/scaled-triplets" and hub_dataset_id(str(tmp_path)) is None
    info = run_info(str(trained_here), "fashioniq", "train", "val", extra_triplets="me/scaled-triplets")
    assert info["base_model"] == HUB_BASE and info["datasets"] == ["me/scaled-triplets"]
    assert info["eval_dataset"] == ("fashioniq", "FashionIQ") and str(tmp_path) not in json.dumps(info)


def test_the_card_of_a_reloaded_best_checkpoint_shows_its_evaluation():
    history = [{"loss": 2.0, "step": 4}, {"eval_recall@10": 50.0, "eval_epoch": 1.0, "step": 4},
               {"eval_recall@10": 25.0, "eval_epoch": 2.0, "step": 8}, {"train_loss": 1.0, "step": 8}]
    assert logged_evaluation(history) == {"recall@10": 25.0}  # the last one
    assert logged_evaluation(history, step=4) == {"recall@10": 50.0}  # load_best_model_at_end: checkpoint-4's
    assert logged_evaluation([{"loss": 1.0, "step": 1}]) is None


@pytest.mark.parametrize("value", [38.999998569488525, 61.10000014305115])
def test_metrics_are_rounded_for_people_and_the_index(value):
    from modeling_spn4cir.model_cards import eval_results, metrics_table

    (result,) = eval_results({"recall@10": value}, "cirr", "CIRR", "val", "cirr")
    assert result.metric_value == round(value, 4) and str(round(value, 2)) in metrics_table({"recall@10": value})
