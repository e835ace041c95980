"""Exact CIR metrics: hand-computed cases, a randomized comparison with straightforward reference
implementations (full sort + id comparison, as the original code), validation (bad data is an error naming the
query, never a number), submission files."""

import json

import evaluate
import numpy as np
import pytest
import torch

import trainers
from trainers.evaluation import (
    PROTOCOLS,
    circo_metrics,
    cirr_metrics,
    fashioniq_average,
    fashioniq_metrics,
    map_from_rankings,
    protocol_for,
    rank_gallery,
    recall_from_rankings,
    recall_metrics,
    write_circo_submission,
    write_cirr_submission,
)


def ranked_query(order, m, d=None):
    """A query whose cosine ranking over a one-hot gallery of size m is exactly `order` (then the rest)."""
    d = d or m
    q = torch.zeros(d)
    for rank, idx in enumerate(order):
        q[idx] = float(len(order) - rank) + 1.0
    return q


def one_hot_gallery(m):
    return torch.eye(m)


IDS = [f"img{i:02d}" for i in range(60)]


# ----------------------------------------------------------------------------------------- FashionIQ
def test_fashioniq_reference_removal_changes_result():
    gallery = one_hot_gallery(60)
    # query 0: reference img00 ranked first, target img10 at position 10 (0-based) -> R@10 miss unless removed
    order0 = [0] + list(range(1, 10)) + [10]
    # query 1: target img55 at position 0
    order1 = [55, 3]
    queries = torch.stack([ranked_query(order0, 60), ranked_query(order1, 60)])
    refs, tgts = ["img00", "img03"], ["img10", "img55"]
    kept = fashioniq_metrics(queries, gallery, IDS, refs, tgts, remove_reference=False)
    removed = fashioniq_metrics(queries, gallery, IDS, refs, tgts, remove_reference=True)
    assert kept == {"recall@10": 50.0, "recall@50": 100.0}
    assert removed == {"recall@10": 100.0, "recall@50": 100.0}


def test_fashioniq_average_is_rmean():
    avg = fashioniq_average({
        "dress": {"recall@10": 38.82, "recall@50": 62.92},
        "shirt": {"recall@10": 45.83, "recall@50": 66.44},
        "toptee": {"recall@10": 48.80, "recall@50": 71.29},
    })
    # the paper's CLIP4CIR +SPN row: Avg R@10 44.48, Avg R@50 66.88, Rmean 55.68
    assert round(avg["average_recall@10"], 2) == 44.48
    assert round(avg["average_recall@50"], 2) == 66.88
    assert round(avg["average"], 2) == 55.68


# ---------------------------------------------------------------------------------------------- CIRR
def test_cirr_hand_computed():
    gallery = one_hot_gallery(60)
    members = ["img00", "img01", "img02", "img03", "img04", "img05"]
    # q0: reference img00 first, then img02, img01 (target) ... -> full rank of target after removal: 1 (0-based)
    #     subset (members minus img00) ranked img02, img01, ... -> subset position 1
    q0 = ranked_query([0, 2, 1, 3, 4, 5], 60)
    # q1: reference img01; ranking img30..img39 (10 non-members), then img05 (target); subset: img05 first
    q1 = ranked_query([1] + list(range(30, 40)) + [5, 0, 2, 3, 4], 60)
    m = cirr_metrics(torch.stack([q0, q1]), gallery, IDS, ["img00", "img01"], ["img01", "img05"], [members, members])
    assert m["recall@1"] == 0.0
    assert m["recall@5"] == 50.0 and m["recall@10"] == 50.0  # q1's target is at position 10 after removal
    assert m["recall@50"] == 100.0
    assert m["recall_subset@1"] == 50.0 and m["recall_subset@2"] == 100.0 and m["recall_subset@3"] == 100.0
    assert m["average"] == (50.0 + 50.0) / 2


def test_tie_broken_by_gallery_order():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # 0, 2, 3 identical
    q = torch.tensor([[1.0, 0.0]])
    assert rank_gallery(q, gallery, 3).tolist() == [[0, 2, 3]]
    assert rank_gallery(q, gallery, 2).tolist() == [[0, 2]]
    assert rank_gallery(q, gallery, 2, exclude=torch.tensor([0])).tolist() == [[2, 3]]
    # the tie-handling path when topk picked a higher index than an equal lower one
    many = torch.ones(50, 4)
    many[7] = torch.tensor([2.0, 0, 0, 0])
    assert rank_gallery(torch.tensor([[1.0, 1, 1, 1]]), many, 5).tolist() == [[0, 1, 2, 3, 4]]


# --------------------------------------------------------------------------------------------- CIRCO
def test_circo_multi_target_hand_computed():
    gallery = one_hot_gallery(60)
    # reference img00 first (removed). Ranking after removal: img01(gt) img02 img03(gt) img04 ... img09(gt at 8)
    q = ranked_query([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 60)
    m = circo_metrics(q[None], gallery, IDS, ["img00"], [["img01", "img03", "img09", "img59"]], remove_reference=True)
    # P@1 = 1, P@3 = 2/3, P@9 = 3/9; |GT| = 4
    ap5 = (1 + 2 / 3) / 4
    ap10 = (1 + 2 / 3 + 3 / 9) / 4
    assert m["map@5"] == pytest.approx(ap5 * 100, abs=1e-5)
    assert m["map@10"] == pytest.approx(ap10 * 100, abs=1e-5)
    assert m["map@25"] == pytest.approx(ap10 * 100, abs=1e-5)  # img59 is last: ranks 58 > 50
    # one GT only and K=5: divide by min(1, 5) = 1
    m1 = circo_metrics(q[None], gallery, IDS, ["img00"], [["img03"]], remove_reference=True)
    assert m1["map@5"] == pytest.approx(100 / 3, abs=1e-5)


def test_circo_reference_removal_is_a_switch_defaulting_to_the_authors_protocol():
    """The reference ranks first: the CIRCO authors' code (default) keeps it, so every GT moves one rank down."""
    gallery = one_hot_gallery(60)
    q = ranked_query([0, 1, 2, 3], 60)  # reference img00 first, then GT img01, img02, GT img03
    kept = circo_metrics(q[None], gallery, IDS, ["img00"], [["img01", "img03"]])
    removed = circo_metrics(q[None], gallery, IDS, ["img00"], [["img01", "img03"]], remove_reference=True)
    assert kept["map@5"] == pytest.approx((1 / 2 + 2 / 4) / 2 * 100, abs=1e-5)  # GTs at ranks 2 and 4
    assert removed["map@5"] == pytest.approx((1 / 1 + 2 / 3) / 2 * 100, abs=1e-5)  # GTs at ranks 1 and 3
    assert protocol_for("circo").name == "circo" and "kept" in PROTOCOLS["circo"]
    assert protocol_for("circo", remove_reference=True).name == "circo_remove_reference"
    assert "removed" in PROTOCOLS["circo_remove_reference"]


# ------------------------------------------------------------------- randomized vs reference code
def reference_rankings(q, g, ids, refs=None):
    """What the original code does: full argsort of distances, an array of names, optional name removal."""
    qn = torch.nn.functional.normalize(q.float(), dim=-1)
    gn = torch.nn.functional.normalize(g.float(), dim=-1)
    sorted_idx = torch.argsort(-(qn @ gn.T), dim=-1, stable=True)
    names = np.array(ids)[sorted_idx]
    if refs is not None:
        keep = names != np.array(refs)[:, None]
        names = names[keep].reshape(names.shape[0], names.shape[1] - 1)
    return names


def reference_recall(names, targets, k):
    labels = torch.tensor(names == np.array(targets)[:, None])
    return (torch.sum(labels[:, :k]) / len(labels)).item() * 100


def reference_subset_recall(names, targets, members, k):
    group_mask = (names[..., None] == np.array(members)[:, None, :]).sum(-1).astype(bool)
    group_labels = torch.tensor(names == np.array(targets)[:, None])[torch.tensor(group_mask)].reshape(len(names), -1)
    return (torch.sum(group_labels[:, :k]) / len(group_labels)).item() * 100


def reference_map(names, gts, k):
    aps = []
    for row, gt in zip(names, gts):
        labels = torch.tensor(np.isin(row, gt))
        precisions = torch.cumsum(labels, dim=0) * labels
        precisions = precisions / torch.arange(1, labels.shape[0] + 1)
        aps.append(float(torch.sum(precisions[:k]) / min(len(gt), k)))
    return np.mean(aps) * 100


@pytest.mark.parametrize("n,m,d,seed", [(7, 60, 8, 0), (50, 300, 16, 1), (200, 1000, 32, 2), (33, 51, 4, 3)])
def test_random_against_reference_implementation(n, m, d, seed):
    g = torch.Generator().manual_seed(seed)
    gallery = torch.randn(m, d, generator=g)
    queries = torch.randn(n, d, generator=g).half()  # any float dtype
    ids = [f"x{i}" for i in range(m)]
    perm = lambda: torch.randperm(m, generator=g).tolist()
    refs = [ids[perm()[0]] for _ in range(n)]
    tgts = [ids[i] for i in torch.randint(m, (n,), generator=g).tolist()]
    tgts = [t if t != r else ids[(ids.index(t) + 1) % m] for t, r in zip(tgts, refs)]
    members = []
    for r, t in zip(refs, tgts):
        others = [ids[i] for i in perm() if ids[i] not in (r, t)][:4]
        members.append([r, t] + others)

    kept = reference_rankings(queries, gallery, ids)
    removed = reference_rankings(queries, gallery, ids, refs)
    fiq = fashioniq_metrics(queries, gallery, ids, refs, tgts, remove_reference=False, chunk_size=16)
    fiq_r = fashioniq_metrics(queries, gallery, ids, refs, tgts, remove_reference=True, chunk_size=16)
    for k in (10, 50):
        assert fiq[f"recall@{k}"] == reference_recall(kept, tgts, k)
        assert fiq_r[f"recall@{k}"] == reference_recall(removed, tgts, k)
    cirr = cirr_metrics(queries, gallery, ids, refs, tgts, members, chunk_size=7)
    for k in (1, 5, 10, 50):
        assert cirr[f"recall@{k}"] == reference_recall(removed, tgts, k)
    for k in (1, 2, 3):
        assert cirr[f"recall_subset@{k}"] == reference_subset_recall(removed, tgts, members, k)
    gts = [[t] + mem[2:2 + i % 4] for i, (t, mem) in enumerate(zip(tgts, members))]
    circo = circo_metrics(queries, gallery, ids, refs, gts, chunk_size=5, remove_reference=True)
    circo_kept = circo_metrics(queries, gallery, ids, refs, gts, chunk_size=5)
    for k in (5, 10, 25, 50):
        assert circo[f"map@{k}"] == pytest.approx(reference_map(removed[:, :50], gts, k), rel=1e-6)
        assert circo_kept[f"map@{k}"] == pytest.approx(reference_map(kept[:, :50], gts, k), rel=1e-6)
    # the top-k lists themselves equal the reference ranking's head
    top = rank_gallery(queries, gallery, 50, chunk_size=9)
    assert (np.array(ids)[top] == kept[:, : top.shape[1]]).all()


# -------------------------------------------------------------------------------------- validation
def test_validation_errors():
    g = one_hot_gallery(5)
    ids = ["a", "b", "c", "d", "e"]
    q = torch.randn(2, 5)
    with pytest.raises(ValueError, match="dimensions differ"):
        fashioniq_metrics(torch.randn(2, 4), g, ids, ["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match=r"2 target ids are not in the gallery \(first: \['zz', 'yy'\]\)"):
        fashioniq_metrics(q, g, ids, ["a", "b"], ["zz", "yy"])
    with pytest.raises(ValueError, match="1 reference ids"):
        cirr_metrics(q, g, ids, ["a", "nope"], ["c", "d"], [ids, ids])
    with pytest.raises(ValueError, match="group member"):
        cirr_metrics(q, g, ids, ["a", "b"], ["c", "d"], [ids, ["b", "c", "d", "e", "f", "g"]])
    with pytest.raises(ValueError, match="duplicate"):
        fashioniq_metrics(q, g, ["a", "b", "a", "d", "e"], ["a", "b"], ["d", "e"])
    with pytest.raises(ValueError, match="5 gallery embeddings but 4"):
        fashioniq_metrics(q, g, ids[:4], ["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="3 query embeddings but 2"):
        fashioniq_metrics(torch.randn(3, 5), g, ids, ["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match=r"differ across queries: 3 for query 1 \(reference 'b'\), 4 for query 0"):
        cirr_metrics(q, g, ids, ["a", "b"], ["c", "d"], [ids, ["b", "c", "d", "e"]])


def test_metrics_count_short_rankings_as_misses_and_name_the_query_on_bad_data():
    # A ranking shorter than K without the target is a miss at every K (it used to be a hit).
    assert recall_from_rankings([["a", "b"], ["c"]], ["zz", "c"], (1, 10)) == {"recall@1": 50.0, "recall@10": 50.0}
    # FashionIQ module: 50-deep rankings, reference removed (49 left), target absent -> R@50 = 0, not 100.
    ranked = [[f"g{i}" for i in range(50)] for _ in range(3)]
    fiq = evaluate.load(trainers.metric_path("fashioniq")).compute(
        predictions=ranked, references=["t0", "t1", "t2"], reference_ids=["g0", "g1", "g2"], remove_reference=True)
    assert fiq == {"recall@10": 0.0, "recall@50": 0.0}
    # Tensor path: 5-image gallery, the target is the reference (deleted): a miss, never a hit.
    gallery = torch.eye(5)
    m = fashioniq_metrics(torch.ones(1, 5), gallery, IDS[:5], ["img00"], ["img00"], remove_reference=True)
    assert m == {"recall@10": 0.0, "recall@50": 0.0}
    # numpy inputs are accepted and give the same numbers as tensors.
    q = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    args = (IDS[:5], IDS[:4], IDS[1:5])
    assert recall_metrics(q.numpy(), gallery.numpy(), *args) == recall_metrics(q, gallery, *args)
    assert recall_from_rankings(np.array([["a", "b"]]), np.array(["b"]), (1, 2)) == {"recall@1": 0.0, "recall@2": 100.0}
    with pytest.raises(TypeError, match="query_embeds must be a torch.Tensor or a numpy array"):
        recall_metrics(q.tolist(), gallery, *args)

    # Duplicated predictions: CIRCO mAP would exceed 100 -> error naming the query and the id.
    with pytest.raises(ValueError, match="ranking of query 1 lists 'b' more than once"):
        map_from_rankings([["a", "b"], ["b", "b", "b"]], [["a"], ["b"]])
    # Empty ground truths: NaN before -> error naming the query.
    with pytest.raises(ValueError, match="query 1 has no ground-truth list"):
        map_from_rankings([["a"], ["b"]], [["a"], []])
    with pytest.raises(ValueError, match=r"query 0 \(reference 'img00'\) has no ground-truth list"):
        circo_metrics(torch.ones(1, 5), gallery, IDS[:5], ["img00"], [[]])
    # NaN / inf embeddings -> error naming the query or the gallery image.
    bad = q.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"query 2 \(reference 'img02'\)"):
        recall_metrics(bad, gallery, *args)
    bad_gallery = gallery.clone()
    bad_gallery[3, 0] = float("inf")
    with pytest.raises(ValueError, match="image 'img03'"):
        circo_metrics(q, bad_gallery, IDS[:5], IDS[:4], [[t] for t in IDS[1:5]])
    # CIRR target outside its group members -> error naming the query.
    members = [IDS[:6], IDS[6:12]]
    with pytest.raises(ValueError, match=r"target 'img20' of query 1 \(reference 'img06'\) is not among its group"):
        cirr_metrics(torch.randn(2, 60), torch.eye(60), IDS, ["img00", "img06"], ["img01", "img20"], members)
    # Empty CIRR queries and a one-image gallery with the reference removed -> clear errors.
    with pytest.raises(ValueError, match="no queries to evaluate"):
        cirr_metrics(torch.empty(0, 60), torch.eye(60), IDS, [], [], [])
    with pytest.raises(ValueError, match="gallery has 1 image"):
        fashioniq_metrics(torch.ones(1, 5), torch.ones(1, 5), ["img00"], ["img00"], ["img00"], remove_reference=True)


# ------------------------------------------------------------------------------------- submissions
def test_cirr_submission_structure(tmp_path):
    gallery = one_hot_gallery(60)
    members = [IDS[:6], IDS[6:12]]
    q = torch.stack([ranked_query([0, 3, 2] + list(range(10, 60)), 60), ranked_query([6, 9, 7], 60)])
    recall_path, subset_path = write_cirr_submission(q, gallery, IDS, ["img00", "img06"], [12060, 7], members, tmp_path, "m")
    recall, subset = json.loads(recall_path.read_text()), json.loads(subset_path.read_text())
    assert recall_path.name == "recall_submission_m.json" and subset_path.name == "recall_subset_submission_m.json"
    assert recall["version"] == "rc2" and recall["metric"] == "recall"
    assert subset["version"] == "rc2" and subset["metric"] == "recall_subset"
    assert set(recall) == {"version", "metric", "12060", "7"}
    assert len(recall["12060"]) == 50 and "img00" not in recall["12060"] and recall["12060"][:2] == ["img03", "img02"]
    assert subset["12060"] == ["img03", "img02", "img01"] and subset["7"] == ["img09", "img07", "img08"]
    assert list(json.loads(recall_path.read_text())) == sorted(recall)  # sort_keys, as the original
    with pytest.raises(ValueError, match=r"pair_ids must be unique .* 1 are listed more than once \(first: \['7'\]\)"):
        write_cirr_submission(q.repeat(2, 1), gallery, IDS, ["img00", "img06"] * 2, [12060, 7, 8, "7"], members * 2,
                              tmp_path, "dup")
    assert not (tmp_path / "recall_submission_dup.json").exists()
    with pytest.raises(ValueError, match="2 reference_ids for 1 pair_ids"):
        write_cirr_submission(q, gallery, IDS, ["img00", "img06"], [1], members, tmp_path, "short")


def test_circo_submission_structure(tmp_path):
    gallery = one_hot_gallery(60)
    q = torch.stack([ranked_query([0, 5, 4], 60), ranked_query([1, 2], 60)])
    path = write_circo_submission(q, gallery, IDS, ["img00", "img01"], [0, 1], tmp_path / "circo.json",
                                  remove_reference=True)
    sub = json.loads(path.read_text())
    assert set(sub) == {"0", "1"} and all(len(v) == 50 for v in sub.values())
    assert sub["0"][:2] == ["img05", "img04"] and "img00" not in sub["0"] and sub["1"][0] == "img02"
    kept = json.loads(write_circo_submission(q, gallery, IDS, ["img00", "img01"], [0, 1], tmp_path / "k.json").read_text())
    assert kept["0"][:3] == ["img00", "img05", "img04"] and kept["1"][:2] == ["img01", "img02"]
    with pytest.raises(ValueError, match="2 reference_ids for 3 query_ids"):
        write_circo_submission(q, gallery, IDS, ["img00", "img01"], [0, 1, 2], tmp_path / "bad.json")


# --------------------------------------------------------------------------------- evaluate modules
def test_evaluate_modules_equal_functions():
    g = torch.Generator().manual_seed(5)
    gallery, queries = torch.randn(80, 8, generator=g), torch.randn(20, 8, generator=g)
    ids = [f"y{i}" for i in range(80)]
    refs = [ids[i] for i in range(20)]
    tgts = [ids[79 - i] for i in range(20)]
    members = [[r, t] + ids[40:44] for r, t in zip(refs, tgts)]
    removed = reference_rankings(queries, gallery, ids, refs)
    subsets = [[x for x in row if x in mem and x != r] for row, mem, r in zip(removed, members, refs)]
    cirr = evaluate.load(trainers.metric_path("cirr")).compute(
        predictions=removed[:, :50].tolist(), references=tgts, subset_predictions=subsets)
    assert cirr == cirr_metrics(queries, gallery, ids, refs, tgts, members)
    kept = reference_rankings(queries, gallery, ids)
    fiq = evaluate.load(trainers.metric_path("fashioniq"))
    assert fiq.compute(predictions=kept[:, :51].tolist(), references=tgts) == fashioniq_metrics(
        queries, gallery, ids, refs, tgts)
    assert fiq.compute(predictions=kept[:, :51].tolist(), references=tgts, reference_ids=refs,
                       remove_reference=True) == fashioniq_metrics(queries, gallery, ids, refs, tgts, True)
    gts = [[t, ids[50]] for t in tgts]
    circo = evaluate.load(trainers.metric_path("circo")).compute(predictions=removed[:, :50].tolist(), references=gts)
    assert circo == pytest.approx(circo_metrics(queries, gallery, ids, refs, gts, remove_reference=True), rel=1e-9)
    assert recall_from_rankings([["a", "b"]], ["b"], (1, 2)) == {"recall@1": 0.0, "recall@2": 100.0}
    assert map_from_rankings([["a", "b"]], [["b", "zz"]])["map@5"] == pytest.approx(25.0)
    with pytest.raises(ValueError, match="No bundled metric"):
        trainers.metric_path("nope")
