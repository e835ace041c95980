"""CIRCO as its authors evaluate it (miccunifi/CIRCO `src/evaluation.py`, `compute_metrics`): Recall@K of
`target_img_id` and mAP@10 per semantic aspect next to mAP@K, checked against a straight re-implementation of that
numpy code on data built here; the shared-concept protocol; the converter keeping `semantic_aspects`."""

import json
import warnings
from collections import defaultdict

import datasets
import numpy as np
import pytest
import torch
from test_evaluation import IDS, one_hot_gallery, ranked_query, reference_rankings
from test_protocols import _evaluate, _triplets

from trainers.evaluation import PROTOCOLS, circo_metrics, get_protocol, map_from_rankings, protocol_for

ASPECTS = ["cardinality", "addition", "negation", "direct_addressing", "compare_change", "comparative_statement",
           "statement_with_conjunction", "spatial_relations_background", "viewpoint"]
RANKS = [5, 10, 25, 50]


def authors_metrics(predictions: dict, annotations: list[dict], ranks=RANKS):
    """`compute_metrics` of the CIRCO authors, written out from its formulas: AP@K = sum_{i<=K} P@i rel(i) /
    min(|GT|, K) and Recall@K = [target_img_id in the top K] per query, then `np.mean` (fractions, not percent);
    the AP@10 of a query counts for each of its semantic aspects; an aspect without queries gives NaN."""
    aps, recalls, semantic = defaultdict(list), defaultdict(list), defaultdict(list)
    for query_id, ranked in predictions.items():
        record = annotations[int(query_id)]
        ranked = np.array(ranked)
        labels = np.isin(ranked, record["gt_img_ids"])
        precisions = np.cumsum(labels, axis=0) * labels
        precisions = precisions / np.arange(1, labels.shape[0] + 1)
        for k in ranks:
            aps[k].append(float(np.sum(precisions[:k]) / min(len(record["gt_img_ids"]), k)))
            recalls[k].append(float(np.sum((ranked == record["target_img_id"])[:k])))
        for aspect in record.get("semantic_aspects", []):
            semantic[aspect].append(float(np.sum(precisions[:10]) / min(len(record["gt_img_ids"]), 10)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the mean of an empty list
        semantic_map = {a: float(np.mean(semantic[a])) for a in ASPECTS}
    return ({k: float(np.mean(aps[k])) for k in ranks}, {k: float(np.mean(recalls[k])) for k in ranks},
            semantic_map)


def _random_annotations(n_queries: int, gallery: list[str], seed: int, with_unlisted_aspect: bool = False):
    """CIRCO-like val records over `gallery` (ids as strings): 1-8 ground truths, the target among them, 0-4 of
    the nine aspects (and an aspect the authors do not report), and a random 50-deep ranking per query in which
    ground truths are likely (half of its ids are drawn from the ground truths' neighbourhood)."""
    rng = np.random.default_rng(seed)
    records, predictions = [], {}
    for q in range(n_queries):
        gts = list(rng.choice(gallery, size=int(rng.integers(1, 9)), replace=False))
        aspects = list(rng.choice(ASPECTS, size=int(rng.integers(0, 5)), replace=False))
        if with_unlisted_aspect and q % 3 == 0:
            aspects.append("not_an_aspect")
        records.append({"id": q, "reference_img_id": str(rng.choice(gallery)), "target_img_id": gts[0],
                        "gt_img_ids": gts, "semantic_aspects": aspects})
        pool = list(dict.fromkeys(gts + list(rng.choice(gallery, size=120, replace=False))))
        predictions[str(q)] = list(rng.permutation(pool)[:50])
    return records, predictions


@pytest.mark.parametrize("n_queries,seed", [(40, 0), (200, 1), (7, 2)])
def test_ranked_ids_equal_the_authors_compute_metrics(n_queries, seed):
    gallery = [str(100000 + i) for i in range(300)]
    records, predictions = _random_annotations(n_queries, gallery, seed, with_unlisted_aspect=True)
    ranked = [predictions[str(r["id"])] for r in records]
    ours = map_from_rankings(ranked, [r["gt_img_ids"] for r in records], [r["target_img_id"] for r in records],
                             [r["semantic_aspects"] for r in records])
    maps, recalls, semantic = authors_metrics(predictions, records)
    for k in RANKS:
        assert ours[f"recall@{k}"] == recalls[k] * 100  # float64 as theirs: equal, not close
        assert ours[f"map@{k}"] == pytest.approx(maps[k] * 100, rel=1e-6)  # SEARLE's float32 AP
    for aspect in ASPECTS:
        key = f"semantic_map@10_{aspect}"
        if np.isnan(semantic[aspect]):  # no query has it: theirs is NaN, ours leaves the key out
            assert key not in ours
        else:
            assert ours[key] == semantic[aspect] * 100
    assert not any("not_an_aspect" in key for key in ours)  # an aspect outside the nine is not reported
    assert {k for k in ours if k.startswith("semantic")} <= {f"semantic_map@10_{a}" for a in ASPECTS}


def test_embeddings_equal_the_authors_code_on_their_ranking():
    """Through `circo_metrics` on embeddings: the authors' formulas on the full argsort of the same scores."""
    g = torch.Generator().manual_seed(5)
    m, n = 120, 30
    gallery, queries = torch.randn(m, 8, generator=g), torch.randn(n, 8, generator=g)
    ids = [str(i) for i in range(m)]
    records, _ = _random_annotations(n, ids, seed=3)
    for removed in (False, True):
        refs = [r["reference_img_id"] for r in records]
        names = reference_rankings(queries, gallery, ids, refs if removed else None)[:, :50]
        theirs = authors_metrics({str(q): list(row) for q, row in enumerate(names)}, records)
        ours = circo_metrics(queries, gallery, ids, refs, [r["gt_img_ids"] for r in records], chunk_size=7,
                             remove_reference=removed, target_ids=[r["target_img_id"] for r in records],
                             semantic_aspects=[r["semantic_aspects"] for r in records])
        assert all(ours[f"recall@{k}"] == theirs[1][k] * 100 for k in RANKS)
        assert all(ours[f"semantic_map@10_{a}"] == theirs[2][a] * 100 for a in ASPECTS if not np.isnan(theirs[2][a]))


def test_hand_computed_recall_and_aspects():
    """Query 0: target img05 third, ground truths at ranks 1 and 3; query 1: target img40 at rank 30 (a miss at
    K = 5, 10, 25), its one ground truth. Aspects: query 0 'negation', both 'viewpoint'."""
    gallery = one_hot_gallery(60)
    q0 = ranked_query([7, 2, 5], 60)
    q1 = ranked_query([i for i in range(10, 40)] + [40], 60)
    metrics = circo_metrics(torch.stack([q0, q1]), gallery, IDS, ["img00", "img01"], [["img05", "img07"], ["img40"]],
                            target_ids=["img05", "img40"], semantic_aspects=[["negation", "viewpoint"], ["viewpoint"]])
    assert (metrics["recall@5"], metrics["recall@10"], metrics["recall@25"], metrics["recall@50"]) == (50, 50, 50, 100)
    ap10_q0 = (1 / 1 + 2 / 3) / 2  # ground truths at ranks 1 and 3
    assert metrics["semantic_map@10_negation"] == pytest.approx(ap10_q0 * 100)
    assert metrics["semantic_map@10_viewpoint"] == pytest.approx((ap10_q0 + 0.0) / 2 * 100)
    assert "semantic_map@10_cardinality" not in metrics
    # without the new inputs, the mAP@K alone, as before
    plain = circo_metrics(torch.stack([q0, q1]), gallery, IDS, ["img00", "img01"], [["img05", "img07"], ["img40"]])
    assert sorted(plain) == ["map@10", "map@25", "map@5", "map@50"]
    assert all(plain[k] == metrics[k] for k in plain)
    with pytest.raises(ValueError, match="1 target_ids for 2 queries"):
        circo_metrics(torch.stack([q0, q1]), gallery, IDS, ["img00", "img01"], [["img05"], ["img40"]],
                      target_ids=["img05"])


# ------------------------------------------------------------------------------------------ protocols
def _circo_split(aspects):
    triplets = _triplets([(0, 1), (2, 3)])
    return triplets.add_column("semantic_aspects", aspects)


def test_the_circo_protocols_report_recall_and_semantic_aspects():
    triplets = _circo_split([["addition"], ["addition", "negation"]])
    order = [[1, 5], [7, 6, 8, 9, 10, 11, 3]]  # query 0: target first; query 1: target seventh
    results = _evaluate("circo", triplets, order)[1]
    assert (results["recall@5"], results["recall@10"]) == (50.0, 100.0)
    assert results["map@10"] == pytest.approx((1 + 1 / 7) / 2 * 100, rel=1e-6)
    assert results["semantic_map@10_addition"] == pytest.approx((1 + 1 / 7) / 2 * 100)
    assert results["semantic_map@10_negation"] == pytest.approx(100 / 7)
    without = _evaluate("circo", _triplets([(0, 1), (2, 3)]), order)[1]  # a conversion without the column
    assert not any(k.startswith("semantic") for k in without) and without["recall@10"] == 100.0


def test_the_shared_concept_protocol_puts_the_shared_concept_before_the_relative_caption():
    """The model ranks the target first only for the text 's0 q0' (shared concept, space, relative caption)."""
    from test_protocols import _corpus, _processor, _RankingModel, _Tokenizer

    from trainers.evaluation import CIREvaluator

    triplets = _triplets([(0, 4)])
    tokenizer = _Tokenizer(["q0", "s0 q0"])
    model = _RankingModel([[5, 6, 7, 8, 9, 10, 4], [4]])  # token 0 ('q0'): target 7th; token 1 ('s0 q0'): first
    scores = {name: CIREvaluator(_corpus(), triplets, _processor, tokenizer, protocol=name,
                                 show_progress_bar=False)(model) for name in ("circo", "circo_shared_concept")}
    assert scores["circo_shared_concept"]["map@5"] == 100.0 and scores["circo"]["map@5"] == 0.0
    protocol = get_protocol("circo_shared_concept")
    assert protocol.query_texts(triplets) == [["s0 q0"]]
    assert '"{shared_concept} {relative_caption}"' in PROTOCOLS["circo_shared_concept"]
    assert protocol_for("circo_shared_concept", remove_reference=True).name == "circo_shared_concept_remove_reference"
    with pytest.raises(ValueError, match=r"'circo_shared_concept'.*column\(s\) \['shared_concept'\].*datasets_scripts"
                                         r"\.circo"):
        protocol.query_texts(triplets.remove_columns("shared_concept"))


# ------------------------------------------------------------------------------------------ converter
def test_the_converter_keeps_semantic_aspects_and_the_target(tmp_path):
    from PIL import Image

    from datasets_scripts.circo import build_circo
    from datasets_scripts.common import AnnotationError

    root = tmp_path / "circo"
    (root / "unlabeled2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    for i, coco_id in enumerate([11, 22, 33]):
        Image.new("RGB", (8, 8), (i * 80, 0, 0)).save(root / "unlabeled2017" / f"{coco_id:012d}.jpg")
    record = {"id": 0, "reference_img_id": 11, "target_img_id": 22, "gt_img_ids": [22, 33],
              "relative_caption": "is red", "shared_concept": "a car", "semantic_aspects": ["cardinality", "viewpoint"]}
    (root / "annotations" / "val.json").write_text(json.dumps([record, {**record, "id": 1, "semantic_aspects": []}]))
    val = datasets.load_dataset(str(build_circo(root, tmp_path / "out", splits=["val"])), "triplets", split="val")
    assert val["semantic_aspects"] == [["cardinality", "viewpoint"], []]
    assert val["target_id"] == ["22", "22"] and val["shared_concept"] == ["a car", "a car"]
    (root / "annotations" / "val.json").write_text(json.dumps([{**record, "semantic_aspects": "viewpoint"}]))
    with pytest.raises(AnnotationError, match=r"val\.json: record 0 field 'semantic_aspects' is 'viewpoint', expected "
                                              "a list of strings"):
        build_circo(root, tmp_path / "out2", splits=["val"])
