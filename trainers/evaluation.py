"""Exact CIR evaluation: FashionIQ, CIRR and CIRCO metrics, chunked ranking, test-server submissions.

What is exact: the ranking (the top-K lists of the reference code, for the same scores and without exact ties)
and therefore every hit count and the set of hits at each rank. The arithmetic on those counts is the reference
code's in some cases and close to it in the others:
- recalls are `(hits_tensor / n_queries).item() * 100` (a float32 ratio), bit-for-bit CLIP4Cir's `validate.py`,
  the TG-CIR / BLIP4CIR / SPRC code and SPN4CIR's CIRR code; SPN4CIR's CLIP4CIR FashionIQ code computes
  `hits / N * 100` in Python doubles, so its numbers can differ in the float32 rounding of the ratio (below
  1e-5 in percent);
- the FashionIQ averages use `statistics.mean`, as CLIP4Cir and SPN4CIR;
- CIRCO's AP@K is computed in float32 torch tensors, as the CIRCO authors' validation code (SEARLE
  `circo_compute_val_metrics`), and averaged with a Python sum where that code uses `np.mean`; the CIRCO
  `evaluation.py` (the test server's) computes in numpy float64: mAP values can differ by float rounding
  (relative 1e-6), never by a hit.

Ranking (`rank_gallery`, on `modeling_spn4cir.ranking.rank_topk`) is exact, computed in query chunks with
`torch.topk`, in memory O(chunk * M + N * k); no N x M argsort and no N x M array of strings. Scores are cosine
similarity by default, or a CIR model's own `similarity` (`similarity=model.similarity`, e.g. SPRC's max over
target tokens, where `gallery_embeds` is `[M, Q, D]`). **Ties** are broken by gallery order:
of two gallery images with the same score, the one listed first in `gallery_ids` ranks higher. (The reference
code uses an unstable argsort, so on exact ties it has no defined order; with float features ties are rare.)

Protocols (say which one with every number you publish):
- `fashioniq`: gallery = the category's `split.{cat}.val.json`; hit if the target is in the top K.
  `remove_reference=False` (the reference stays in the ranking) is the CLIP4Cir / TG-CIR / BLIP4CIR / SPRC code;
  `remove_reference=True` is SPN4CIR's CLIP4CIR code (the reference is deleted before the top K).
- `cirr`: gallery = every image of the split file; the reference is deleted from each ranking; the subset
  ranking is the full ranking restricted to the query's group members minus the reference (5 images).
- `circo`: mAP@K = mean over queries of sum_{i<=K} P@i * rel(i) / min(|GT|, K); `remove_reference=False` (the
  default, protocol `circo`) ranks the whole gallery as the CIRCO authors' code does; `True`
  (`circo_remove_reference`) deletes the reference first.

Bad data is an error naming the query, never a number: a NaN/inf embedding (it would rank by gallery order and
give finite, plausible metrics), an empty query set, a gallery left empty by `remove_reference`, a CIRR target
that is not among its group members (the CIRR annotations always list it there; the reference code
(CLIP4Cir `validate.py`) would count such a query as a silent subset miss, and the test server's code is not
public), a CIRCO query without ground truths (NaN), an id listed twice in one ranking (CIRCO mAP above 100).
A ranking shorter than K (a small gallery, or 50-deep id lists with the reference removed) counts an absent
target as a **miss**, never a hit. Embeddings may be torch tensors or numpy arrays.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modeling_spn4cir.storage import atomic_write_json
from modeling_spn4cir.ranking import DEFAULT_CHUNK_SIZE, Similarity, rank_candidates, rank_topk

CIRR_RECALL_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
FASHIONIQ_KS = (10, 50)
CIRCO_KS = (5, 10, 25, 50)
# Position of a target absent from its ranking: beyond any K, so a ranking shorter than K never counts it as a hit.
_ABSENT = torch.iinfo(torch.long).max

PROTOCOLS = {
    "fashioniq": "FashionIQ val, category gallery = split.{cat}.val.json, reference kept in the ranking "
    "(CLIP4Cir / TG-CIR / BLIP4CIR / SPRC protocol)",
    "fashioniq_remove_reference": "FashionIQ val, category gallery = split.{cat}.val.json, reference removed "
    "from the ranking (SPN4CIR CLIP4CIR protocol)",
    "cirr": "CIRR rc2, gallery = all images of the split, reference removed; subset = group members minus "
    "the reference",
    "circo": "CIRCO, gallery = COCO unlabeled2017, mAP@K with AP@K = sum P@i rel(i) / min(|GT|, K), "
    "reference kept in the ranking (the CIRCO authors' code)",
    "circo_remove_reference": "CIRCO, gallery = COCO unlabeled2017, mAP@K with AP@K = sum P@i rel(i) / min(|GT|, K), "
    "reference removed from the ranking",
    "recall": "Recall@K over the split's gallery, reference removed",
}


def protocol_name(dataset: str, remove_reference: bool = False) -> str:
    """The key of `PROTOCOLS` used for `dataset` (`fashioniq`, `cirr`, `circo`, or anything else)."""
    if dataset in ("fashioniq", "circo"):
        return f"{dataset}_remove_reference" if remove_reference else dataset
    return dataset if dataset in PROTOCOLS else "recall"


# ------------------------------------------------------------------------------------------ validation
def _gallery_index(gallery_ids: Sequence[str]) -> dict[str, int]:
    index: dict[str, int] = {}
    duplicates = []
    for i, gid in enumerate(gallery_ids):
        if gid in index:
            duplicates.append(gid)
        index[gid] = i
    if duplicates:
        raise ValueError(
            f"gallery_ids has {len(duplicates)} duplicate ids (first: {duplicates[:5]}); each gallery image must "
            "appear once (de-duplicate the corpus, or merge duplicates with datasets_scripts.dedup)."
        )
    return index


def _lookup(index: dict[str, int], ids: Sequence[str], what: str) -> torch.Tensor:
    missing = [i for i in ids if i not in index]
    if missing:
        unique = list(dict.fromkeys(missing))
        raise ValueError(
            f"{len(missing)} {what} ids are not in the gallery (first: {unique[:5]}); the gallery must contain "
            "every reference and target image of the queries."
        )
    return torch.tensor([index[i] for i in ids], dtype=torch.long)


def _as_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise TypeError(f"{what} must be a torch.Tensor or a numpy array, got {type(x).__name__}.")


def _query_name(i: int, reference_ids: Sequence[str] | None) -> str:
    return f"query {i}" + (f" (reference {reference_ids[i]!r})" if reference_ids is not None else "")


def _check_finite(query_embeds: torch.Tensor, gallery_embeds: torch.Tensor, gallery_ids, reference_ids) -> None:
    """NaN/inf scores rank by gallery order and give finite, plausible metrics: refuse them, naming the culprit."""
    sides = (("query", query_embeds, lambda row: _query_name(row, reference_ids)),
             ("gallery", gallery_embeds, lambda row: f"image {list(gallery_ids)[row]!r}"))
    for side, embeds, name in sides:
        bad = ~torch.isfinite(embeds).flatten(1).all(dim=1)
        if bad.any():
            rows = torch.nonzero(bad).flatten().tolist()
            raise ValueError(
                f"{len(rows)} {side} embeddings contain NaN or inf (first: {name(rows[0])}); the model produced "
                "non-finite outputs (a diverged checkpoint, or fp16 overflow): check its weights."
            )


def _check_embeddings(query_embeds, gallery_embeds, gallery_ids, n_queries: int, reference_ids=None,
                      remove_reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes, sizes and values; returns the embeddings as tensors (numpy arrays are accepted)."""
    query_embeds = _as_tensor(query_embeds, "query_embeds")
    gallery_embeds = _as_tensor(gallery_embeds, "gallery_embeds")
    if n_queries == 0:
        raise ValueError("There are no queries to evaluate (empty triplets / id lists): check the split's annotations.")
    if query_embeds.ndim != 2 or gallery_embeds.ndim not in (2, 3):
        raise ValueError(
            f"query_embeds must be [N, D] and gallery_embeds [M, D] (or [M, Q, D]); got {tuple(query_embeds.shape)} "
            f"and {tuple(gallery_embeds.shape)}."
        )
    if query_embeds.shape[1] != gallery_embeds.shape[-1]:
        raise ValueError(
            f"Embedding dimensions differ: queries {query_embeds.shape[1]}, gallery {gallery_embeds.shape[-1]}."
        )
    if gallery_embeds.shape[0] != len(gallery_ids):
        raise ValueError(f"{gallery_embeds.shape[0]} gallery embeddings but {len(gallery_ids)} gallery_ids.")
    if query_embeds.shape[0] != n_queries:
        raise ValueError(f"{query_embeds.shape[0]} query embeddings but {n_queries} queries in the id lists.")
    if remove_reference and len(gallery_ids) < 2:
        raise ValueError(
            f"The gallery has {len(gallery_ids)} image(s): with the reference removed from each ranking nothing is "
            "left to retrieve; evaluate on a gallery with at least 2 images (or keep the reference)."
        )
    _check_finite(query_embeds, gallery_embeds, gallery_ids, reference_ids)
    return query_embeds, gallery_embeds


# --------------------------------------------------------------------------------------------- ranking
def _scoring(query_embeds, gallery_embeds, similarity):
    """Inputs and rule of the ranker: cosine (both sides normalized, float32) unless a similarity is given."""
    query_embeds = _as_tensor(query_embeds, "query_embeds")
    gallery_embeds = _as_tensor(gallery_embeds, "gallery_embeds")
    if similarity is None:
        queries = F.normalize(query_embeds.detach().float(), dim=-1)
        return queries, F.normalize(gallery_embeds.detach().float(), dim=-1).to(queries.device), None
    return query_embeds.detach(), gallery_embeds.detach().to(query_embeds.device), similarity


def rank_gallery(
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    similarity: Similarity | None = None,
) -> torch.Tensor:
    """
    Exact top-k by cosine similarity (or by `similarity`).

    Args:
        query_embeds: `[N, D]`, gallery_embeds: `[M, D]` (or `[M, Q, D]` with a token-level `similarity`).
        k: ranking depth (capped at the number of rankable gallery images).
        exclude: `[N]` gallery index to delete from each query's ranking (the reference), or None.
        chunk_size: queries scored at once; memory is O(chunk_size * M + N * k).
        similarity: a CIR model's `similarity`; default cosine (inputs normalized here).

    Returns:
        `[N, min(k, M - (exclude is not None))]` gallery indices, best first, ties by lower index.
    """
    queries, gallery, similarity = _scoring(query_embeds, gallery_embeds, similarity)
    return rank_topk(queries, gallery, k, similarity, exclude, chunk_size)


def rank_subsets(
    query_embeds: torch.Tensor, gallery_embeds: torch.Tensor, subset_indices: torch.Tensor,
    similarity: Similarity | None = None,
) -> torch.Tensor:
    """Rank each query's own candidate set: `subset_indices` `[N, S]` gallery indices -> the same indices
    reordered by score (ties by lower gallery index), i.e. the full ranking restricted to the set."""
    queries, gallery, similarity = _scoring(query_embeds, gallery_embeds, similarity)
    return rank_candidates(queries, gallery, subset_indices, similarity)


def _target_positions(ranked: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based position of each target in its ranked row `[N, k]`; `_ABSENT` (a miss at every K) when absent."""
    hits = ranked == targets[:, None]
    found = hits.any(dim=1)
    positions = hits.int().argmax(dim=1)
    return torch.where(found, positions, torch.full_like(positions, _ABSENT))


def _recall(positions: torch.Tensor, k: int) -> float:
    # The reference code's arithmetic: an int64 hit count divided into a float32 ratio, then * 100.
    return (torch.sum(positions < k) / len(positions)).item() * 100


# ------------------------------------------------------------------------------------ metric functions
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
        raise ValueError("fashioniq_average needs the metrics of at least one category.")
    r10 = statistics.mean(m["recall@10"] for m in per_category.values())
    r50 = statistics.mean(m["recall@50"] for m in per_category.values())
    return {"average_recall@10": r10, "average_recall@50": r50, "average": (r10 + r50) / 2}


def _subset_without_reference(
    index: dict[str, int], group_members: Sequence[Sequence[str]], reference_ids: Sequence[str]
) -> torch.Tensor:
    rows = []
    for i, (members, reference) in enumerate(zip(group_members, reference_ids)):
        if isinstance(members, str):
            raise ValueError(f"group_members of {_query_name(i, reference_ids)} is the string {members!r}; it must "
                             "be a list of image ids (CIRR img_set.members).")
        row = [m for m in dict.fromkeys(members) if m != reference]
        rows.append(_lookup(index, row, "group member"))
    sizes = {len(r) for r in rows}
    if len(sizes) > 1:
        raise ValueError(
            f"CIRR group sizes (members minus the reference) differ across queries: {sorted(sizes)}; each "
            "img_set.members must list 6 images including the reference."
        )
    return torch.stack(rows) if rows else torch.empty(0, 0, dtype=torch.long)


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
    query_embeds, gallery_embeds = _check_embeddings(query_embeds, gallery_embeds, gallery_ids, n, reference_ids,
                                                     remove_reference=True)
    for i, (members, target) in enumerate(zip(group_members, target_ids)):
        if members is None or isinstance(members, str):
            raise ValueError(f"group_members of {_query_name(i, reference_ids)} is {members!r}; it must be a list "
                             "of image ids (CIRR img_set.members).")
        if target not in members:
            raise ValueError(
                f"The CIRR target {target!r} of {_query_name(i, reference_ids)} is not among its group members "
                f"{list(members)}; the CIRR annotations always list it in img_set.members (fix the triplets)."
            )
    index = _gallery_index(gallery_ids)
    targets = _lookup(index, target_ids, "target")
    references = _lookup(index, reference_ids, "reference")
    ranked = rank_gallery(query_embeds, gallery_embeds, max(CIRR_RECALL_KS), references, chunk_size, similarity)
    positions = _target_positions(ranked, targets)
    subset = rank_subsets(query_embeds, gallery_embeds, _subset_without_reference(index, group_members, reference_ids),
                          similarity)
    subset_positions = _target_positions(subset, targets)
    metrics = {f"recall@{k}": _recall(positions, k) for k in CIRR_RECALL_KS}
    metrics |= {f"recall_subset@{k}": _recall(subset_positions, k) for k in CIRR_SUBSET_KS}
    metrics["average"] = (metrics["recall@5"] + metrics["recall_subset@1"]) / 2
    return metrics


def _check_ground_truths(target_ids_list, reference_ids=None) -> None:
    for i, ground_truths in enumerate(target_ids_list):
        if isinstance(ground_truths, str) or ground_truths is None or len(ground_truths) == 0:
            raise ValueError(
                f"CIRCO {_query_name(i, reference_ids)} has no ground-truth list ({ground_truths!r}); AP@K is "
                "undefined without one: every query needs a non-empty list of ids (gt_img_ids)."
            )


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


def circo_metrics(
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    gallery_ids: Sequence[str],
    reference_ids: Sequence[str],
    target_ids_list: Sequence[Sequence[str]],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    similarity: Similarity | None = None,
    remove_reference: bool = False,
) -> dict[str, float]:
    """CIRCO `map@5/10/25/50` (percent); `target_ids_list[i]` are the ground truths of query i (`gt_img_ids`).
    `remove_reference=False` (protocol `circo`) ranks the whole gallery as the CIRCO authors' code does (SEARLE's
    `circo_compute_val_metrics` and test submission: top-50 of `predicted @ index.T`); `True` (protocol
    `circo_remove_reference`) deletes the reference image from each ranking first."""
    if len(reference_ids) != len(target_ids_list):
        raise ValueError(f"{len(reference_ids)} reference_ids for {len(target_ids_list)} queries.")
    query_embeds, gallery_embeds = _check_embeddings(query_embeds, gallery_embeds, gallery_ids, len(target_ids_list),
                                                     reference_ids, remove_reference)
    _check_ground_truths(target_ids_list, reference_ids)
    index = _gallery_index(gallery_ids)
    positives = [_lookup(index, list(dict.fromkeys(t)), "target") for t in target_ids_list]
    references = _lookup(index, reference_ids, "reference") if remove_reference else None
    ranked = rank_gallery(query_embeds, gallery_embeds, max(CIRCO_KS), references, chunk_size, similarity)
    return _mean_average_precision(ranked, positives)


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
    datasets without an official protocol (e.g. the synthetic benchmark)."""
    if len(reference_ids) != len(target_ids):
        raise ValueError(f"{len(reference_ids)} reference_ids for {len(target_ids)} target_ids.")
    query_embeds, gallery_embeds = _check_embeddings(query_embeds, gallery_embeds, gallery_ids, len(target_ids),
                                                     reference_ids, remove_reference)
    index = _gallery_index(gallery_ids)
    targets = _lookup(index, target_ids, "target")
    exclude = _lookup(index, reference_ids, "reference") if remove_reference else None
    ranked = rank_gallery(query_embeds, gallery_embeds, max(ks), exclude, chunk_size, similarity)
    positions = _target_positions(ranked, targets)
    return {f"recall@{k}": _recall(positions, k) for k in ks}


# --------------------------------------------------------------------- metrics from ranked id lists
def _check_rankings(ranked_ids, n_queries: int, what: str) -> list[list[str]]:
    """Ranked id lists as plain lists; an id listed twice (it would count twice) is an error naming the query."""
    if len(ranked_ids) != n_queries:
        raise ValueError(f"{len(ranked_ids)} rankings for {n_queries} {what}.")
    if n_queries == 0:
        raise ValueError("There are no rankings to evaluate (empty predictions): check the inputs.")
    rankings = []
    for i, ranking in enumerate(ranked_ids):
        if isinstance(ranking, str):
            raise ValueError(f"The ranking of query {i} is the string {ranking!r}; it must be a list of ids.")
        ranking = [str(x) for x in ranking]
        if len(set(ranking)) != len(ranking):
            seen, duplicate = set(), None
            for x in ranking:
                if x in seen:
                    duplicate = x
                    break
                seen.add(x)
            raise ValueError(
                f"The ranking of query {i} lists {duplicate!r} more than once; each id must appear at most once per "
                "ranking (a repeated hit would be counted twice): de-duplicate the predictions."
            )
        rankings.append(ranking)
    return rankings


def _positions_from_ranked_ids(ranked_ids: Sequence[Sequence[str]], target_ids: Sequence[str]) -> torch.Tensor:
    rankings = _check_rankings(ranked_ids, len(target_ids), "targets")
    targets = [str(t) for t in target_ids]
    return torch.tensor([r.index(t) if t in r else _ABSENT for r, t in zip(rankings, targets)], dtype=torch.long)


def recall_from_rankings(
    ranked_ids: Sequence[Sequence[str]], target_ids: Sequence[str], ks: Sequence[int]
) -> dict[str, float]:
    """`recall@K` (percent) from ranked id lists (best first), with the same arithmetic as above. A target absent
    from a ranking shorter than K is a miss."""
    positions = _positions_from_ranked_ids(ranked_ids, target_ids)
    return {f"recall@{k}": _recall(positions, k) for k in ks}


def map_from_rankings(
    ranked_ids: Sequence[Sequence[str]], target_ids_list: Sequence[Sequence[str]]
) -> dict[str, float]:
    """CIRCO `map@K` (percent) from ranked id lists (best first, as ranked: remove the reference beforehand for the
    `circo_remove_reference` protocol)."""
    ranked_ids = _check_rankings(ranked_ids, len(target_ids_list), "ground-truth lists")
    _check_ground_truths(target_ids_list)
    vocabulary = {i: n for n, i in enumerate(dict.fromkeys(x for r in ranked_ids for x in r))}
    depth = max((len(r) for r in ranked_ids), default=0)
    # Ids outside every ranking map to -1 (never matched); short rankings are padded with -2.
    ranked = torch.tensor([[vocabulary[x] for x in r] + [-2] * (depth - len(r)) for r in ranked_ids])
    positives = [torch.tensor([vocabulary.get(str(t), -1) for t in dict.fromkeys(ts)]) for ts in target_ids_list]
    return _mean_average_precision(ranked.reshape(len(ranked_ids), depth), positives)


# -------------------------------------------------------------------------------- submission files
def cirr_predictions(
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    gallery_ids: Sequence[str],
    reference_ids: Sequence[str],
    group_members: Sequence[Sequence[str]],
    k: int = 50,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    similarity: Similarity | None = None,
) -> tuple[list[list[str]], list[list[str]]]:
    """Top-`k` gallery ids (reference removed) and the top-3 subset ids of each query."""
    query_embeds, gallery_embeds = _check_embeddings(query_embeds, gallery_embeds, gallery_ids, len(reference_ids),
                                                     reference_ids, remove_reference=True)
    index = _gallery_index(gallery_ids)
    references = _lookup(index, reference_ids, "reference")
    ranked = rank_gallery(query_embeds, gallery_embeds, k, references, chunk_size, similarity)
    subset = rank_subsets(query_embeds, gallery_embeds, _subset_without_reference(index, group_members, reference_ids),
                          similarity)
    ids = list(gallery_ids)
    return (
        [[ids[i] for i in row] for row in ranked.tolist()],
        [[ids[i] for i in row[: max(CIRR_SUBSET_KS)]] for row in subset.tolist()],
    )


def write_cirr_submission(
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    gallery_ids: Sequence[str],
    reference_ids: Sequence[str],
    pair_ids: Sequence[int | str],
    group_members: Sequence[Sequence[str]],
    output_dir: str | os.PathLike,
    name: str = "spn4cir",
    similarity: Similarity | None = None,
) -> tuple[Path, Path]:
    """Write the two CIRR test-server files (`recall_submission_<name>.json`, top-50 ids, and
    `recall_subset_submission_<name>.json`, top-3 subset ids), reference excluded, keys `str(pairid)`."""
    if len(pair_ids) != len(set(map(str, pair_ids))):
        raise ValueError("pair_ids must be unique (one CIRR test query per pairid).")
    top50, top3 = cirr_predictions(query_embeds, gallery_embeds, gallery_ids, reference_ids, group_members,
                                   similarity=similarity)
    recall = {"version": "rc2", "metric": "recall"} | {str(p): r for p, r in zip(pair_ids, top50)}
    subset = {"version": "rc2", "metric": "recall_subset"} | {str(p): r for p, r in zip(pair_ids, top3)}
    output_dir = Path(output_dir)
    return (
        atomic_write_json(output_dir / f"recall_submission_{name}.json", recall, sort_keys=True),
        atomic_write_json(output_dir / f"recall_subset_submission_{name}.json", subset, sort_keys=True),
    )


def write_circo_submission(
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    gallery_ids: Sequence[str],
    reference_ids: Sequence[str],
    query_ids: Sequence[int | str],
    path: str | os.PathLike,
    similarity: Similarity | None = None,
    remove_reference: bool = False,
) -> Path:
    """Write the CIRCO test-server file `{"<query id>": [top-50 gallery ids]}`; the reference stays in the ranking
    as in the CIRCO authors' submission code unless `remove_reference`."""
    query_embeds, gallery_embeds = _check_embeddings(query_embeds, gallery_embeds, gallery_ids, len(query_ids),
                                                     reference_ids, remove_reference)
    index = _gallery_index(gallery_ids)
    references = _lookup(index, reference_ids, "reference") if remove_reference else None
    ranked = rank_gallery(query_embeds, gallery_embeds, 50, references, similarity=similarity)
    ids = list(gallery_ids)
    return atomic_write_json(Path(path), {str(q): [ids[i] for i in row] for q, row in zip(query_ids, ranked.tolist())}, sort_keys=True)


__all__ = [
    "PROTOCOLS",
    "protocol_name",
    "rank_gallery",
    "rank_subsets",
    "fashioniq_metrics",
    "fashioniq_average",
    "cirr_metrics",
    "circo_metrics",
    "recall_metrics",
    "recall_from_rankings",
    "map_from_rankings",
    "cirr_predictions",
    "write_cirr_submission",
    "write_circo_submission",
]

