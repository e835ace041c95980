"""The metric functions: FashionIQ / generic Recall@K, CIRR Recall@K and Recall_subset@K, CIRCO mAP@K (and the
CIRCO authors' Recall@K of the target and mAP@10 per semantic aspect), on embeddings (ranked here) or on ranked id
lists (the `evaluate` modules). Results are in percent."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from modeling_spn4cir.retrieval import DEFAULT_CHUNK_SIZE, Similarity

from .ranking import ABSENT, check_ground_truths, rank_queries, recall_at, target_positions

CIRR_RECALL_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
FASHIONIQ_KS = (10, 50)
CIRCO_KS = (5, 10, 25, 50)
# The CIRCO authors' `evaluation.py` reports mAP@10 per semantic aspect of the queries, for these nine.
CIRCO_SEMANTIC_ASPECTS = ("cardinality", "addition", "negation", "direct_addressing", "compare_change",
                          "comparative_statement", "statement_with_conjunction", "spatial_relations_background",
                          "viewpoint")
CIRCO_SEMANTIC_K = 10


# ------------------------------------------------------------------------------------- on embeddings
def recall_metrics(
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    gallery_ids: Sequence[str],
    reference_ids: Sequence[str],
    target_ids: Sequence[str],
    ks: Sequence[int] = CIRR_RECALL_KS,
    remove_reference: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    similarity: Similarity | None = None,
) -> dict[str, float]:
    """`recall@K` (percent): hit if the target is in the top K. The FashionIQ metric, and the generic one for
    datasets without an official protocol (e.g. the synthetic benchmark). Embeddings: `[N, D]` queries,
    `[M, D]` (or `[M, Q, D]`) gallery."""
    if len(reference_ids) != len(target_ids):
        raise ValueError(f"{len(reference_ids)} reference_ids for {len(target_ids)} target_ids; each query needs "
                         "one reference and one target.")
    ranking = rank_queries(query_embeds, gallery_embeds, gallery_ids, reference_ids, max(ks), remove_reference,
                           target_ids=target_ids, chunk_size=chunk_size, similarity=similarity)
    positions = target_positions(ranking.ranked, ranking.targets)
    return {f"recall@{k}": recall_at(positions, k) for k in ks}


def fashioniq_metrics(
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    gallery_ids: Sequence[str],
    reference_ids: Sequence[str],
    target_ids: Sequence[str],
    remove_reference: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    similarity: Similarity | None = None,
) -> dict[str, float]:
    """FashionIQ `recall@10`, `recall@50` (percent) for one category. `remove_reference=False` is the
    CLIP4Cir / TG-CIR / BLIP4CIR / SPRC protocol, `True` SPN4CIR's CLIP4CIR protocol."""
    return recall_metrics(query_embeds, gallery_embeds, gallery_ids, reference_ids, target_ids, FASHIONIQ_KS,
                          remove_reference, chunk_size, similarity)


def fashioniq_average(per_category: dict[str, dict[str, float]]) -> dict[str, float]:
    """The 3-category summary: `average_recall@10`, `average_recall@50` and their mean `average`
    (Rmean), averaged like CLIP4Cir (`statistics.mean`)."""
    if not per_category:
        raise ValueError("fashioniq_average needs the metrics of at least one category: pass "
                         "{category: fashioniq_metrics(...)}.")
    r10 = statistics.mean(m["recall@10"] for m in per_category.values())
    r50 = statistics.mean(m["recall@50"] for m in per_category.values())
    return {"average_recall@10": r10, "average_recall@50": r50, "average": (r10 + r50) / 2}


def cirr_average(metrics: dict[str, float]) -> float:
    """CIRR's headline number: (recall@5 + recall_subset@1) / 2."""
    return (metrics["recall@5"] + metrics["recall_subset@1"]) / 2


def cirr_metrics(
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    gallery_ids: Sequence[str],
    reference_ids: Sequence[str],
    target_ids: Sequence[str],
    group_members: Sequence[Sequence[str]],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    similarity: Similarity | None = None,
) -> dict[str, float]:
    """CIRR `recall@1/5/10/50`, `recall_subset@1/2/3` and `average` = (recall@5 + recall_subset@1) / 2, in
    percent. The reference is deleted from every ranking; the subset is the group minus the reference."""
    n = len(target_ids)
    if not len(reference_ids) == len(group_members) == n:
        raise ValueError(f"reference_ids ({len(reference_ids)}), group_members ({len(group_members)}) and "
                         f"target_ids ({n}) must have one entry per query.")
    ranking = rank_queries(query_embeds, gallery_embeds, gallery_ids, reference_ids, max(CIRR_RECALL_KS), True,
                           target_ids=target_ids, group_members=group_members, chunk_size=chunk_size,
                           similarity=similarity)
    positions = target_positions(ranking.ranked, ranking.targets)
    subset_positions = target_positions(ranking.subset, ranking.targets)
    metrics = {f"recall@{k}": recall_at(positions, k) for k in CIRR_RECALL_KS}
    metrics |= {f"recall_subset@{k}": recall_at(subset_positions, k) for k in CIRR_SUBSET_KS}
    metrics["average"] = cirr_average(metrics)
    return metrics


def _mean_average_precision(ranked: torch.Tensor, positives: Sequence[torch.Tensor]) -> dict[str, float]:
    """CIRCO's AP@K on ranked indices `[N, k]`, with SEARLE's validation float32 tensor arithmetic."""
    aps: dict[int, list[float]] = {k: [] for k in CIRCO_KS}
    arange = torch.arange(1, ranked.shape[1] + 1)
    for row, gt in zip(ranked, positives):
        labels = torch.isin(row, gt)
        precisions = torch.cumsum(labels, dim=0) * labels / arange
        for k in CIRCO_KS:
            aps[k].append(float(torch.sum(precisions[:k]) / min(len(gt), k)))
    return {f"map@{k}": float(sum(v) / len(v)) * 100 if v else 0.0 for k, v in aps.items()}


def _target_recall(ranked: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """CIRCO `recall@K` (percent) of each query's `target_img_id` (rows `[N]`) in its ranking `[N, k]`, with the CIRCO
    authors' arithmetic (`np.mean` of per-query 0/1 floats, float64), times 100."""
    positions = target_positions(ranked, targets).numpy()
    return {f"recall@{k}": float(np.mean((positions < k).astype(np.float64))) * 100 for k in CIRCO_KS}


def _semantic_map(ranked: torch.Tensor, positives: Sequence[torch.Tensor],
                  aspects: Sequence[Sequence[str] | None]) -> dict[str, float]:
    """CIRCO `semantic_map@10_{aspect}` (percent): the mean AP@10 of the queries with that semantic aspect, for each
    of `CIRCO_SEMANTIC_ASPECTS` that some query has (the authors' code gives NaN for the others: left out here).
    The authors' numpy float64 arithmetic, operation for operation (`evaluation.py` `compute_metrics`)."""
    per_aspect: dict[str, list[float]] = defaultdict(list)
    for row, gt, query_aspects in zip(ranked.numpy(), positives, aspects, strict=True):
        labels = np.isin(row, gt.numpy())
        precisions = np.cumsum(labels, axis=0) * labels / np.arange(1, labels.shape[0] + 1)
        ap = float(np.sum(precisions[:CIRCO_SEMANTIC_K]) / min(len(gt), CIRCO_SEMANTIC_K))
        for aspect in query_aspects or ():
            per_aspect[aspect].append(ap)
    return {f"semantic_map@{CIRCO_SEMANTIC_K}_{aspect}": float(np.mean(per_aspect[aspect])) * 100
            for aspect in CIRCO_SEMANTIC_ASPECTS if per_aspect[aspect]}


def _circo_scores(ranked: torch.Tensor, positives: Sequence[torch.Tensor], targets: torch.Tensor | None,
                  aspects: Sequence[Sequence[str] | None] | None) -> dict[str, float]:
    """`map@K`, and where given the target's `recall@K` and the `semantic_map@10_{aspect}`s."""
    metrics = _mean_average_precision(ranked, positives)
    if targets is not None:
        metrics |= _target_recall(ranked, targets)
    if aspects is not None:
        metrics |= _semantic_map(ranked, positives, aspects)
    return metrics


def circo_metrics(
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    gallery_ids: Sequence[str],
    reference_ids: Sequence[str],
    target_ids_list: Sequence[Sequence[str]],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    similarity: Similarity | None = None,
    remove_reference: bool = False,
    target_ids: Sequence[str] | None = None,
    semantic_aspects: Sequence[Sequence[str] | None] | None = None,
) -> dict[str, float]:
    """CIRCO `map@5/10/25/50` (percent); `target_ids_list[i]` are the ground truths of query i (`gt_img_ids`).
    `remove_reference=False` (protocol `circo`) ranks the whole gallery as the CIRCO authors' code does (SEARLE's
    `circo_compute_val_metrics` and test submission: top-50 of `predicted @ index.T`); `True` (protocol
    `circo_remove_reference`) deletes the reference image from each ranking first.

    As the CIRCO authors' `evaluation.py` also reports: with `target_ids` (`target_img_id`, one per query)
    `recall@5/10/25/50` of that target; with `semantic_aspects` (each query's list, None for none)
    `semantic_map@10_{aspect}` for each aspect of `CIRCO_SEMANTIC_ASPECTS` that some query has. Those are computed
    in float64 as that code; `map@K` keeps SEARLE's float32 (they can differ in the 7th significant digit)."""
    if len(reference_ids) != len(target_ids_list):
        raise ValueError(f"{len(reference_ids)} reference_ids for {len(target_ids_list)} queries (target_ids_list); "
                         "each query needs one reference and one ground-truth list.")
    _check_per_query(len(reference_ids), target_ids=target_ids, semantic_aspects=semantic_aspects)
    ranking = rank_queries(query_embeds, gallery_embeds, gallery_ids, reference_ids, max(CIRCO_KS), remove_reference,
                           target_ids=target_ids, ground_truth_ids=target_ids_list, chunk_size=chunk_size,
                           similarity=similarity)
    return _circo_scores(ranking.ranked, ranking.ground_truths, ranking.targets, semantic_aspects)


def _check_per_query(n_queries: int, **lists) -> None:
    """Each given list (e.g. `target_ids`) has one entry per query."""
    for name, values in lists.items():
        if values is not None and len(values) != n_queries:
            raise ValueError(f"{len(values)} {name} for {n_queries} queries; pass one per query (None where a query "
                             "has none).")


# --------------------------------------------------------------------------------- on ranked id lists
def _check_rankings(ranked_ids, n_queries: int, what: str) -> list[list[str]]:
    """Ranked id lists as plain lists; an id listed twice (it would count twice) is an error naming the query."""
    if len(ranked_ids) != n_queries:
        raise ValueError(f"{len(ranked_ids)} rankings for {n_queries} {what}; pass one ranking per query.")
    if n_queries == 0:
        raise ValueError("There are no rankings to evaluate (empty predictions): check the inputs.")
    rankings = []
    for i, ranking in enumerate(ranked_ids):
        if isinstance(ranking, str):
            raise ValueError(f"The ranking of query {i} is the string {ranking!r}; it must be a list of ids.")
        ranking = [str(x) for x in ranking]
        if len(set(ranking)) != len(ranking):
            repeated = next(x for j, x in enumerate(ranking) if x in ranking[:j])
            raise ValueError(
                f"The ranking of query {i} lists {repeated!r} more than once; each id must appear at "
                "most once per ranking (a repeated hit would be counted twice): de-duplicate the predictions."
            )
        rankings.append(ranking)
    return rankings


def recall_from_rankings(
    ranked_ids: Sequence[Sequence[str]], target_ids: Sequence[str], ks: Sequence[int]
) -> dict[str, float]:
    """`recall@K` (percent) from ranked id lists (best first), with the same arithmetic as above. A target absent
    from a ranking shorter than K is a miss."""
    rankings = _check_rankings(ranked_ids, len(target_ids), "targets")
    targets = [str(t) for t in target_ids]
    positions = torch.tensor([r.index(t) if t in r else ABSENT for r, t in zip(rankings, targets)], dtype=torch.long)
    return {f"recall@{k}": recall_at(positions, k) for k in ks}


def map_from_rankings(
    ranked_ids: Sequence[Sequence[str]], target_ids_list: Sequence[Sequence[str]],
    target_ids: Sequence[str] | None = None, semantic_aspects: Sequence[Sequence[str] | None] | None = None,
) -> dict[str, float]:
    """CIRCO `map@K` (percent) from ranked id lists (best first, as ranked: remove the reference beforehand for the
    `circo_remove_reference` protocol); with `target_ids` / `semantic_aspects` also `recall@K` and
    `semantic_map@10_{aspect}`, as `circo_metrics`."""
    ranked_ids = _check_rankings(ranked_ids, len(target_ids_list), "ground-truth lists")
    check_ground_truths(target_ids_list)
    _check_per_query(len(ranked_ids), target_ids=target_ids, semantic_aspects=semantic_aspects)
    vocabulary = {i: n for n, i in enumerate(dict.fromkeys(x for r in ranked_ids for x in r))}
    depth = max((len(r) for r in ranked_ids), default=0)
    # Ids outside every ranking map to -1 (never matched); short rankings are padded with -2.
    ranked = torch.tensor([[vocabulary[x] for x in r] + [-2] * (depth - len(r)) for r in ranked_ids])
    positives = [torch.tensor([vocabulary.get(str(t), -1) for t in dict.fromkeys(ts)]) for ts in target_ids_list]
    targets = None if target_ids is None else torch.tensor([vocabulary.get(str(t), -1) for t in target_ids])
    return _circo_scores(ranked.reshape(len(ranked_ids), depth), positives, targets, semantic_aspects)
