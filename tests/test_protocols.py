"""The evaluation protocols as objects: the lookup from dataset names, and each protocol's rules (headline and Ks,
reference removal, gallery scope, text mode, ground truths, test-server files) observed through `CIREvaluator`
with a stand-in model whose rankings are given."""

import json
import re

import datasets
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datasets_scripts.load import default_protocol
from trainers.evaluation import PROTOCOLS, CIREvaluator, get_protocol, protocol_for

# 24 images: img00..img11 are dresses, img12..img23 shirts.
IDS = [f"img{i:02d}" for i in range(24)]
CATEGORIES = ["dress"] * 12 + ["shirt"] * 12
DRESSES, SHIRTS = list(range(12)), list(range(12, 24))


class _Tokenizer:
    """Each known text -> one token, its row in `texts` (or the token `aliases` give it)."""

    def __init__(self, texts, aliases=None):
        self.vocab = {text: i for i, text in enumerate(texts)} | (aliases or {})

    def __call__(self, text, **kwargs):
        ids = torch.tensor([[self.vocab[t]] for t in text])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class _RankingModel(torch.nn.Module):
    """A contract stand-in with given rankings: image i embeds as the one-hot e_i, and the text of token t scores
    the images `orders[t]` highest, in that order (every other image ties at 0, ranked by gallery order)."""

    def __init__(self, orders):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the evaluator reads the parameters' device
        self.queries = torch.zeros(len(orders), len(IDS))
        for token, order in enumerate(orders):
            for rank, image in enumerate(order):
                self.queries[token, image] = float(len(order) - rank)

    def get_target_embeds_and_reference_features(self, pixel_values):
        index = pixel_values.flatten(1)[:, 0].round().long()
        return F.one_hot(index, len(IDS)).float(), index[:, None].float()

    def get_query_embeds(self, input_ids, attention_mask, reference_features=None):
        return self.queries[input_ids[:, 0]]

    def similarity(self, queries, gallery):
        return queries @ gallery.T


def _processor(images, return_tensors="pt"):
    """Each image's number (its red value) as `pixel_values` `[B, 1, 1, 1]`."""
    return {"pixel_values": torch.tensor([[[[float(image.getpixel((0, 0))[0])]]] for image in images])}


def _corpus():
    features = datasets.Features({"image_id": datasets.Value("string"), "image": datasets.Image(),
                                  "category": datasets.Value("string")})
    images = [Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(len(IDS))]
    return datasets.Dataset.from_dict({"image_id": IDS, "image": images, "category": CATEGORIES}, features=features)


def _triplets(queries, texts=None, targets=True):
    """`queries`: (reference, target) image numbers; query j's text is `q{j}` unless `texts` are given."""
    def group(reference, target):
        same = DRESSES if target in DRESSES else SHIRTS
        return [IDS[reference], IDS[target]] + [IDS[i] for i in same if i not in (reference, target)][:4]

    return datasets.Dataset.from_dict({
        "reference_id": [IDS[r] for r, _ in queries],
        "target_id": [IDS[t] if targets else None for _, t in queries],
        "target_ids": [[IDS[t]] if targets else None for _, t in queries],
        "group_members": [group(r, t) for r, t in queries],
        "query_id": [str(j) for j in range(len(queries))],
        "category": [CATEGORIES[t] for _, t in queries],
        "shared_concept": [f"s{j}" for j in range(len(queries))],
        "modification_texts": texts or [[f"q{j}"] for j in range(len(queries))],
    })


def _evaluate(protocol, triplets, orders, texts=None, **kwargs):
    """(the evaluator, its results) for the stand-in model ranking text j as `orders[j]`."""
    texts = texts or [f"q{j}" for j in range(len(orders))]
    # the shared-concept protocols read "s{j} q{j}" (query j's shared concept, a space, its text): the same token
    tokenizer = _Tokenizer(texts, aliases={f"s{j} {text}": j for j, text in enumerate(texts)})
    evaluator = CIREvaluator(_corpus(), triplets, _processor, tokenizer, protocol=protocol, show_progress_bar=False,
                             **kwargs)
    return evaluator, evaluator(_RankingModel(orders))


def _report_hits(report_dir) -> list[list[str]]:
    """The image ids shown as results of each query of a retrieval report."""
    page = (report_dir / "retrieval_report.html").read_text()
    return [re.findall(r"<figure class='hit[^']*' data-image-id='([^']+)'", section)
            for section in page.split("<section class='query'")[1:]]


# ------------------------------------------------------------------------------------------------ lookup
@pytest.mark.parametrize("dataset,remove_reference,expected", [
    ("fashioniq", False, "fashioniq"), ("fashioniq", True, "fashioniq_remove_reference"),
    ("circo", False, "circo"), ("circo", True, "circo_remove_reference"),
    ("cirr", False, "cirr"), ("cirr", True, "cirr"),  # CIRR always removes the reference
    ("recall", False, "recall"), ("recall", True, "recall"),
    ("fashioniq_remove_reference", False, "fashioniq_remove_reference"),
    ("circo_remove_reference", False, "circo_remove_reference"),
    ("synthetic", False, "recall"), ("/data/my_triplets", True, "recall"),  # any other dataset: generic recall
])
def test_protocol_for_maps_dataset_names(dataset, remove_reference, expected):
    protocol = protocol_for(dataset, remove_reference=remove_reference)
    assert protocol.name == expected and PROTOCOLS[expected] == protocol.description
    if dataset not in PROTOCOLS:  # what load_cir_data records for a dataset: the same protocol, by name
        assert default_protocol(dataset) == protocol_for(dataset).name


def test_unknown_protocol_names_are_errors_naming_the_choices():
    with pytest.raises(ValueError, match=r"'cir'; choose one of \['circo', .*'recall'\]"):
        get_protocol("cir")
    with pytest.raises(ValueError, match="'cir'; choose one of"):
        CIREvaluator(_corpus(), _triplets([(0, 1)]), _processor, _Tokenizer(["q0"]), protocol="cir")
    with pytest.raises(ValueError, match=r"protocol 'fashioniq' keeps the reference.*protocol_for\('fashioniq'"):
        CIREvaluator(_corpus(), _triplets([(0, 1)]), _processor, _Tokenizer(["q0"]),
                     protocol=get_protocol("fashioniq"), remove_reference=True)


# ------------------------------------------------------------------------------------- metrics and Ks
@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_every_protocol_returns_its_headline_and_a_metric_at_each_of_its_ks(name):
    triplets = _triplets([(0, 3), (12, 20)])
    evaluator, results = _evaluate(name, triplets, [[0, 5, 3], [20, 12]], name="val")
    protocol = get_protocol(name)
    assert evaluator.protocol is protocol and evaluator.protocol_description == PROTOCOLS[name]
    assert evaluator.primary_metric == f"val_{protocol.headline}" and evaluator.primary_metric in results
    for k in protocol.ks:
        assert any(key.endswith(f"@{k}") for key in results), (name, k, sorted(results))
    assert all(key.startswith("val_") and 0.0 <= value <= 100.0 for key, value in results.items())


# ---------------------------------------------------------------------------------- reference removal
def _order_with_reference_at(position: int) -> list[int]:
    """A dress ranking with the target img10 at position 10 (0-based) and the reference img00 at `position`."""
    others = iter(i for i in DRESSES if i not in (0, 10))
    return [0 if p == position else 10 if p == 10 else next(others) for p in range(12)]


@pytest.mark.parametrize("position", [0, 5, 9, 11])
def test_fashioniq_removing_the_reference_differs_exactly_when_it_outranks_a_target_at_rank_k(position, tmp_path):
    triplets = _triplets([(0, 10)])
    order = [_order_with_reference_at(position)]
    runs = {name: _evaluate(name, triplets, order, report_dir=str(tmp_path / name), report_queries=1,
                            report_top_k=3)[1] for name in ("fashioniq", "fashioniq_remove_reference")}
    kept, removed = runs["fashioniq"], runs["fashioniq_remove_reference"]
    assert kept["dress_recall@10"] == 0.0  # the target is 11th with the reference in the ranking
    assert (removed["dress_recall@10"] != kept["dress_recall@10"]) == (position < 10)
    assert (removed["average"] != kept["average"]) == (position < 10)
    assert removed["dress_recall@50"] == kept["dress_recall@50"] == 100.0
    # the report ranks as the protocol does: the reference is a result only where the protocol keeps it
    kept_hits = _report_hits(tmp_path / "fashioniq")[0]
    removed_hits = _report_hits(tmp_path / "fashioniq_remove_reference")[0]
    assert ("img00" in kept_hits) == (position < 3) and "img00" not in removed_hits
    assert removed_hits == [IDS[i] for i in order[0] if i != 0][:3]


@pytest.mark.parametrize("reference_first", [True, False])
def test_circo_removing_the_reference_differs_exactly_when_it_outranks_a_ground_truth(reference_first):
    triplets = _triplets([(0, 4)])
    order = [[0, 4, 1, 2] if reference_first else [4, 0, 1, 2]]
    kept = _evaluate("circo", triplets, order)[1]
    removed = _evaluate("circo_remove_reference", triplets, order)[1]
    assert removed["map@5"] == 100.0
    assert kept["map@5"] == (50.0 if reference_first else 100.0)


# ------------------------------------------------------------------------------------------ gallery scope
def test_fashioniq_ranks_each_query_within_its_category_gallery(tmp_path):
    """The dress query ranks all 12 shirts above its target: first in its category, 13th over the split."""
    triplets = _triplets([(0, 3)])
    order = [SHIRTS + [3, 0]]
    scoped = _evaluate("fashioniq", triplets, order, report_dir=str(tmp_path / "fiq"), report_queries=1)[1]
    whole = _evaluate("recall", triplets, order, report_dir=str(tmp_path / "recall"), report_queries=1)[1]
    assert scoped["dress_recall@10"] == 100.0 and whole["recall@10"] == 0.0 and whole["recall@50"] == 100.0
    assert _report_hits(tmp_path / "fiq")[0][0] == "img03"
    assert all(CATEGORIES[IDS.index(i)] == "dress" for i in _report_hits(tmp_path / "fiq")[0])
    assert _report_hits(tmp_path / "recall")[0][:8] == [IDS[i] for i in SHIRTS[:8]]


# ---------------------------------------------------------------------------------------------- text
def test_fashioniq_joins_the_two_captions_and_the_others_take_the_first():
    """'q0 and q1' ranks the target first, 'q0' alone last: the results show which text each protocol built."""
    texts, orders = ["q0 and q1", "q0"], [[1, 0], [0] + [i for i in DRESSES if i not in (0, 1)] + [1]]
    triplets = _triplets([(0, 1)], texts=[["q0", "q1"]])
    fiq = lambda **kw: _evaluate("fashioniq", triplets, orders, texts, **kw)[1]
    cirr = lambda **kw: _evaluate("cirr", triplets, orders, texts, **kw)[1]
    assert fiq() == fiq(text_mode="join") != fiq(text_mode="choice")
    assert fiq()["dress_recall@10"] == 100.0 and fiq(text_mode="choice")["dress_recall@10"] == 0.0
    assert cirr() == cirr(text_mode="choice") != cirr(text_mode="join")


# ------------------------------------------------------------------------------------------- ground truths
def test_circo_scores_every_ground_truth_of_target_ids(tmp_path):
    triplets = _triplets([(0, 1)]).remove_columns("target_ids").add_column("target_ids", [[IDS[1], IDS[2]]])
    order = [[2, 5, 1]]  # ground truths at ranks 1 and 3
    circo = _evaluate("circo", triplets, order, report_dir=str(tmp_path), report_queries=1)[1]
    assert circo["map@5"] == pytest.approx((1 / 1 + 2 / 3) / 2 * 100, abs=1e-5)
    page = (tmp_path / "retrieval_report.html").read_text()
    assert "hit target' data-image-id='img02'" in page and "hit target' data-image-id='img01'" in page
    # recall scores the single target_id only (img01, third)
    assert _evaluate("recall", triplets, order)[1]["recall@1"] == 0.0


# ------------------------------------------------------------------------------------------- submissions
def test_test_splits_write_the_protocols_server_files_or_fail_naming_the_protocol(tmp_path):
    test = _triplets([(0, 4), (1, 5)], targets=False)
    orders = [[0, 4, 7], [1, 5]]
    assert _evaluate("cirr", test, orders, name="run", submission_dir=str(tmp_path))[1] == {}
    recall = json.loads((tmp_path / "recall_submission_run.json").read_text())
    assert recall["0"][:2] == ["img04", "img07"] and "img00" not in recall["0"]
    assert (tmp_path / "recall_subset_submission_run.json").exists()
    for name, first in (("circo", "img00"), ("circo_remove_reference", "img04")):
        _evaluate(name, test, orders, name=name, submission_dir=str(tmp_path))
        assert json.loads((tmp_path / f"circo_{name}.json").read_text())["0"][0] == first
    for name in ("fashioniq", "fashioniq_remove_reference", "recall"):
        with pytest.raises(ValueError, match=f"no targets .*protocol '{name}' has no test-server format"):
            _evaluate(name, test, orders, submission_dir=str(tmp_path))
