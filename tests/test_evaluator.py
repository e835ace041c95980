"""CIREvaluator: encodes the gallery once, builds queries from cached reference features, returns the
protocol's metrics (equal to the metric functions on the same embeddings)."""

import datasets
import pytest
import torch
from conftest import solid_images, tiny_model, tiny_tokenizer

from modeling_spn4cir import CLIP4CIRImageProcessor
from trainers.evaluation import cirr_metrics, fashioniq_average, fashioniq_metrics
from trainers.evaluation import CIREvaluator
from trainers.text import compose_text, fashioniq_eval_caption


def _corpus(ids, categories=None):
    data = {"image_id": ids, "image": solid_images(len(ids))}
    features = {"image_id": datasets.Value("string"), "image": datasets.Image()}
    if categories:
        data["category"] = categories
        features["category"] = datasets.Value("string")
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


@pytest.fixture
def setup():
    model = tiny_model("vit", "sum")
    return model, CLIP4CIRImageProcessor(size=32), tiny_tokenizer(["make it blue", "red circle", "and more"])


def _direct_embeddings(model, processor, tokenizer, corpus, triplets, mode):
    model.eval()
    ids = corpus["image_id"]
    with torch.no_grad():
        pixels = processor(list(corpus["image"]))["pixel_values"]
        gallery = model.get_target_embeds(pixels)
        feats = model.get_reference_features(pixels)
        refs = feats[[ids.index(r) for r in triplets["reference_id"]]]
        texts = [compose_text(t, mode, training=False) for t in triplets["modification_texts"]]
        tok = tokenizer(texts, padding=True, return_tensors="pt")
        queries = model.get_query_embeds(tok["input_ids"], tok["attention_mask"], reference_features=refs)
    return queries, gallery


def test_cirr_evaluator_equals_metric_functions(setup, tmp_path):
    model, processor, tokenizer = setup
    ids = [f"dev-{i}" for i in range(12)]
    corpus = _corpus(ids)
    members = [ids[0:6], ids[6:12], ids[0:6]]
    triplets = datasets.Dataset.from_dict({
        "reference_id": ["dev-0", "dev-6", "dev-3"], "target_id": ["dev-2", "dev-9", "dev-1"],
        "modification_texts": [["make it blue"], ["red circle"], ["and more"]],
        "group_members": members, "query_id": ["1", "2", "3"],
    })
    model.train()
    evaluator = CIREvaluator(corpus, triplets, processor, tokenizer, protocol="cirr", name="val", batch_size=5,
                             show_progress_bar=False)
    got = evaluator(model)
    assert model.training  # restored
    q, g = _direct_embeddings(model, processor, tokenizer, corpus, triplets, "choice")
    expected = cirr_metrics(q, g, ids, triplets["reference_id"], triplets["target_id"], members)
    assert got == pytest.approx({f"val_{k}": v for k, v in expected.items()}, abs=1e-9)
    assert evaluator.primary_metric == "val_average" and "reference removed" in evaluator.protocol_description

    test = triplets.remove_columns("target_id")
    sub = CIREvaluator(corpus, test, processor, tokenizer, protocol="cirr", name="t", submission_dir=tmp_path,
                       show_progress_bar=False)
    assert sub(model) == {}
    assert (tmp_path / "recall_submission_t.json").exists() and (tmp_path / "recall_subset_submission_t.json").exists()
    with pytest.raises(ValueError, match="submission_dir"):
        CIREvaluator(corpus, test, processor, tokenizer, protocol="cirr", show_progress_bar=False)(model)


def test_fashioniq_evaluator_per_category(setup):
    model, processor, tokenizer = setup
    ids = [f"B{i:03d}" for i in range(10)]
    cats = ["dress"] * 5 + ["shirt"] * 5
    corpus = _corpus(ids, cats)
    triplets = datasets.Dataset.from_dict({
        "reference_id": ["B000", "B001", "B005", "B006"], "target_id": ["B003", "B004", "B009", "B007"],
        "modification_texts": [["is blue.", "red circle?"], ["and more", "make it blue"]] * 2,
        "category": ["dress", "dress", "shirt", "shirt"],
    })
    got = CIREvaluator(corpus, triplets, processor, tokenizer, protocol="fashioniq", remove_reference=True,
                       show_progress_bar=False)(model)
    q, g = _direct_embeddings(model, processor, tokenizer, corpus, triplets, "join")
    per = {
        "dress": fashioniq_metrics(q[:2], g[:5], ids[:5], ["B000", "B001"], ["B003", "B004"], True),
        "shirt": fashioniq_metrics(q[2:], g[5:], ids[5:], ["B005", "B006"], ["B009", "B007"], True),
    }
    assert got["dress_recall@10"] == per["dress"]["recall@10"] and got["shirt_recall@50"] == per["shirt"]["recall@50"]
    assert got["average"] == fashioniq_average(per)["average"]


def test_missing_reference_in_corpus_is_named(setup):
    model, processor, tokenizer = setup
    corpus = _corpus(["a", "b", "c"])
    triplets = datasets.Dataset.from_dict({"reference_id": ["zz"], "target_id": ["a"], "modification_texts": [["x"]]})
    with pytest.raises(ValueError, match=r"zz"):
        CIREvaluator(corpus, triplets, processor, tokenizer, show_progress_bar=False)(model)


def test_text_composition():
    assert fashioniq_eval_caption(["is red.", " has sleeves?"]) == "is red and has sleeves"
    import random
    rng = random.Random(0)
    seen = {compose_text(["a.", "b"], "join", training=True, rng=rng) for _ in range(200)}
    assert seen == {"a and b", "b and a", "a", "b"}
    assert compose_text(["x", "y"], "choice", training=False) == "x"
    assert {compose_text(["x", "y"], "choice", training=True, rng=rng) for _ in range(50)} == {"x", "y"}
