"""The ranking prelude of every metric and submission writer, written once: validate the embeddings and the id
lists, map ids to gallery rows, rank (optionally without each query's reference).

Ranking runs on the one ranker (`modeling_spn4cir.retrieval.rank_topk`): exact, in query chunks, ties by gallery
order. Scores are cosine similarity by default, or a CIR model's own `similarity` (e.g. SPRC's max over target
tokens, where `gallery_embeds` is `[M, Q, D]`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from modeling_spn4cir.retrieval import DEFAULT_CHUNK_SIZE, Similarity, rank_candidates, rank_topk

# Position of a target absent from its ranking: beyond any K, so a ranking shorter than K never counts it as a hit.
ABSENT = torch.iinfo(torch.long).max


# ------------------------------------------------------------------------------------------ validation
def query_name(i: int, reference_ids: Sequence[str] | None) -> str:
    return f"query {i}" + (f" (reference {reference_ids[i]!r})" if reference_ids is not None else "")


def _as_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise TypeError(f"{what} must be a torch.Tensor or a numpy array, got {type(x).__name__}.")


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


def _check_finite(query_embeds: torch.Tensor, gallery_embeds: torch.Tensor, gallery_ids, reference_ids) -> None:
    """NaN/inf scores rank by gallery order and give finite, plausible metrics: refuse them, naming the culprit."""
    sides = (("query", query_embeds, lambda row: query_name(row, reference_ids)),
             ("gallery", gallery_embeds, lambda row: f"image {list(gallery_ids)[row]!r}"))
    for side, embeds, name in sides:
        bad = ~torch.isfinite(embeds).flatten(1).all(dim=1)
        if bad.any():
            rows = torch.nonzero(bad).flatten().tolist()
            raise ValueError(
                f"{len(rows)} {side} embeddings contain NaN or inf (first: {name(rows[0])}); the model produced "
                "non-finite outputs (a diverged checkpoint, or fp16 overflow): check its weights."
            )


def _check_embeddings(query_embeds, gallery_embeds, gallery_ids, reference_ids: Sequence[str],
                      remove_reference: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes, sizes and values; returns the embeddings as tensors (numpy arrays are accepted)."""
    query_embeds = _as_tensor(query_embeds, "query_embeds")
    gallery_embeds = _as_tensor(gallery_embeds, "gallery_embeds")
    n_queries = len(reference_ids)
    if n_queries == 0:
        raise ValueError("There are no queries to evaluate (empty triplets / id lists): check the split's annotations.")
    if query_embeds.ndim != 2 or gallery_embeds.ndim not in (2, 3):
        raise ValueError(
            f"query_embeds must be [N, D] and gallery_embeds [M, D] (or [M, Q, D]); got {tuple(query_embeds.shape)} "
            f"and {tuple(gallery_embeds.shape)}."
        )
    if query_embeds.shape[1] != gallery_embeds.shape[-1]:
        raise ValueError(
            f"Embedding dimensions differ: queries {query_embeds.shape[1]}, gallery {gallery_embeds.shape[-1]}; "
            "encode both sides with the same model."
        )
    if gallery_embeds.shape[0] != len(gallery_ids):
        raise ValueError(f"{gallery_embeds.shape[0]} gallery embeddings but {len(gallery_ids)} gallery_ids; pass "
                         "one id per gallery row, in row order.")
    if query_embeds.shape[0] != n_queries:
        raise ValueError(f"{query_embeds.shape[0]} query embeddings but {n_queries} queries in the id lists; pass "
                         "one embedding per query, in the order of the id lists.")
    if remove_reference and len(gallery_ids) < 2:
        raise ValueError(
            f"The gallery has {len(gallery_ids)} image(s): with the reference removed from each ranking nothing is "
            "left to retrieve; evaluate on a gallery with at least 2 images (or keep the reference)."
        )
    _check_finite(query_embeds, gallery_embeds, gallery_ids, reference_ids)
    return query_embeds, gallery_embeds


def check_ground_truths(target_ids_list, reference_ids=None) -> None:
    for i, ground_truths in enumerate(target_ids_list):
        if isinstance(ground_truths, str) or ground_truths is None or len(ground_truths) == 0:
            raise ValueError(
                f"CIRCO {query_name(i, reference_ids)} has no ground-truth list ({ground_truths!r}); AP@K is "
                "undefined without one: every query needs a non-empty list of ids (gt_img_ids)."
            )


def _check_group(i: int, members, reference_ids) -> None:
    if members is None or isinstance(members, str):
        raise ValueError(f"group_members of {query_name(i, reference_ids)} is {members!r}; it must be a list "
                         "of image ids (CIRR img_set.members).")


def _check_groups(group_members, target_ids, reference_ids) -> None:
    """A CIRR target outside its group would be a silent subset miss (CLIP4Cir's code): refuse it."""
    for i, (members, target) in enumerate(zip(group_members, target_ids)):
        _check_group(i, members, reference_ids)
        if target not in members:
            raise ValueError(
                f"The CIRR target {target!r} of {query_name(i, reference_ids)} is not among its group members "
                f"{list(members)}; the CIRR annotations always list it in img_set.members (fix the triplets)."
            )


def _subset_without_reference(
    index: dict[str, int], group_members: Sequence[Sequence[str]], reference_ids: Sequence[str]
) -> torch.Tensor:
    """`[N, S]` gallery rows of each query's group members minus its reference."""
    rows = []
    for i, (members, reference) in enumerate(zip(group_members, reference_ids)):
        _check_group(i, members, reference_ids)
        rows.append(_lookup(index, [m for m in dict.fromkeys(members) if m != reference], "group member"))
        if len(rows[-1]) != len(rows[0]):
            raise ValueError(
                f"CIRR group sizes (members minus the reference) differ across queries: {len(rows[-1])} for "
                f"{query_name(i, reference_ids)}, {len(rows[0])} for {query_name(0, reference_ids)}; each "
                "img_set.members must list 6 images including the reference."
            )
    return torch.stack(rows) if rows else torch.empty(0, 0, dtype=torch.long)


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
    return rank_topk(queries, gallery, k, similarity, exclude, chunk_size).indices


def rank_subsets(
    query_embeds: torch.Tensor, gallery_embeds: torch.Tensor, subset_indices: torch.Tensor,
    similarity: Similarity | None = None,
) -> torch.Tensor:
    """Rank each query's own candidate set: `subset_indices` `[N, S]` gallery indices -> the same indices
    reordered by score (ties by lower gallery index), i.e. the full ranking restricted to the set."""
    queries, gallery, similarity = _scoring(query_embeds, gallery_embeds, similarity)
    return rank_candidates(queries, gallery, subset_indices, similarity).indices


@dataclass(frozen=True)
class Ranking:
    """What `rank_queries` returns, as gallery rows (indices into `gallery_ids`).

    ranked: `[N, min(k, M - remove_reference)]`, best first; targets: `[N]`, each query's target (if asked);
    ground_truths: per query, `[G_i]` its de-duplicated ground truths (if asked); subset: `[N, S]`, each query's
    group members minus its reference, best first (if asked)."""

    ranked: torch.Tensor
    targets: torch.Tensor | None = None
    ground_truths: list[torch.Tensor] | None = None
    subset: torch.Tensor | None = None


def rank_queries(
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    gallery_ids: Sequence[str],
    reference_ids: Sequence[str],
    k: int,
    remove_reference: bool,
    *,
    target_ids: Sequence[str] | None = None,
    ground_truth_ids: Sequence[Sequence[str]] | None = None,
    group_members: Sequence[Sequence[str]] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    similarity: Similarity | None = None,
) -> Ranking:
    """
    Validate, map ids to gallery rows and rank: the prelude of every metric function and submission writer.

    Args:
        query_embeds: `[N, D]`, one per entry of `reference_ids`; gallery_embeds: `[M, D]` (or `[M, Q, D]`) of
            `gallery_ids` (torch tensors or numpy arrays).
        k: ranking depth; remove_reference: delete each query's reference from its ranking.
        target_ids: each query's target id (looked up as `Ranking.targets`).
        ground_truth_ids: each query's list of ground-truth ids (CIRCO; `Ranking.ground_truths`).
        group_members: each query's CIRR group; ranked without the reference as `Ranking.subset` (and, with
            `target_ids`, each target must be in its group).

    Bad data is an error naming the query or the id: an empty query set, sizes that do not match, a NaN/inf
    embedding, an id that is not in the gallery (or listed twice in it), a gallery left empty by removing the
    reference, an empty ground-truth list, a CIRR target outside its group.
    """
    query_embeds, gallery_embeds = _check_embeddings(query_embeds, gallery_embeds, gallery_ids, reference_ids,
                                                     remove_reference)
    if ground_truth_ids is not None:
        check_ground_truths(ground_truth_ids, reference_ids)
    if group_members is not None and target_ids is not None:
        _check_groups(group_members, target_ids, reference_ids)
    index = _gallery_index(gallery_ids)
    targets = None if target_ids is None else _lookup(index, target_ids, "target")
    ground_truths = None if ground_truth_ids is None else [
        _lookup(index, list(dict.fromkeys(ids)), "target") for ids in ground_truth_ids]
    exclude = _lookup(index, reference_ids, "reference") if remove_reference else None
    ranked = rank_gallery(query_embeds, gallery_embeds, k, exclude, chunk_size, similarity)
    subset = None
    if group_members is not None:
        subset = rank_subsets(query_embeds, gallery_embeds, _subset_without_reference(index, group_members,
                                                                                      reference_ids), similarity)
    return Ranking(ranked, targets, ground_truths, subset)


def target_positions(ranked: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based position of each target in its ranked row `[N, k]`; `ABSENT` (a miss at every K) when absent."""
    hits = ranked == targets[:, None]
    found = hits.any(dim=1)
    positions = hits.int().argmax(dim=1)
    return torch.where(found, positions, torch.full_like(positions, ABSENT))


def recall_at(positions: torch.Tensor, k: int) -> float:
    """Percent of `positions` `[N]` below `k`."""
    # The reference code's arithmetic: an int64 hit count divided into a float32 ratio, then * 100.
    return (torch.sum(positions < k) / len(positions)).item() * 100
