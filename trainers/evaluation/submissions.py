"""Test-server submission files: CIRR (`recall_submission_<name>.json`, `recall_subset_submission_<name>.json`)
and CIRCO (`{"<query id>": [top-50 gallery ids]}`), ranked like the metrics."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from modeling_spn4cir.retrieval import DEFAULT_CHUNK_SIZE, Similarity
from modeling_spn4cir.storage import atomic_write_json

from .metrics import CIRR_SUBSET_KS
from .ranking import rank_queries


def _check_one_per_query(reference_ids: Sequence[str], other: Sequence, what: str) -> None:
    if len(reference_ids) != len(other):
        raise ValueError(f"{len(reference_ids)} reference_ids for {len(other)} {what}; each query needs one of each.")


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
    """Top-`k` gallery ids (reference removed) and the top-3 subset ids of each query (embeddings `[N, D]` and
    `[M, D]` or `[M, Q, D]`)."""
    _check_one_per_query(reference_ids, group_members, "group_members")
    ranking = rank_queries(query_embeds, gallery_embeds, gallery_ids, reference_ids, k, True,
                           group_members=group_members, chunk_size=chunk_size, similarity=similarity)
    ids = list(gallery_ids)
    return (
        [[ids[i] for i in row] for row in ranking.ranked.tolist()],
        [[ids[i] for i in row[: max(CIRR_SUBSET_KS)]] for row in ranking.subset.tolist()],
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
    repeated = [p for p, n in Counter(map(str, pair_ids)).items() if n > 1]
    if repeated:
        raise ValueError(
            f"pair_ids must be unique (one CIRR test query per pairid); {len(repeated)} are listed more than once "
            f"(first: {repeated[:5]}): de-duplicate the test triplets' query_id column."
        )
    _check_one_per_query(reference_ids, pair_ids, "pair_ids")
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
    _check_one_per_query(reference_ids, query_ids, "query_ids")
    ranking = rank_queries(query_embeds, gallery_embeds, gallery_ids, reference_ids, 50, remove_reference,
                           similarity=similarity)
    ids = list(gallery_ids)
    return atomic_write_json(Path(path), {str(q): [ids[i] for i in row] for q, row in zip(query_ids,
                                                                                         ranking.ranked.tolist())},
                             sort_keys=True)
