"""The evaluation protocols as objects: one `Protocol` per way of scoring a split, holding every rule of it (Ks,
headline metric, reference removal, gallery scope, query text, metric function, test-server writer), so that the
evaluator, its report, `run_cir.py` and its configs ask the protocol instead of branching on names.

    protocol = protocol_for("fashioniq", remove_reference=True)      # -> FASHIONIQ_REMOVE_REFERENCE
    protocol.evaluate(split)                                         # {"dress_recall@10": ..., "average": ...}

Say which protocol (its `description`, also `PROTOCOLS[name]`) with every number you publish.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from datasets_scripts.load import default_protocol
from modeling_spn4cir.retrieval import Similarity

from .metrics import (
    CIRCO_KS,
    CIRR_RECALL_KS,
    FASHIONIQ_KS,
    circo_metrics,
    cirr_metrics,
    fashioniq_average,
    fashioniq_metrics,
    recall_metrics,
)
from .submissions import write_circo_submission, write_cirr_submission

GALLERY_SCOPES = ("split", "category")


@dataclass(frozen=True)
class EncodedSplit:
    """One evaluation split encoded by a CIR model: what a protocol scores.

    queries: `[N, D]` composed queries, one per triplet; gallery: `[M, D]` (or `[M, Q, D]`) target embeddings of
    `gallery_ids` (the corpus' ids, de-duplicated, in corpus order); reference_ids: `[N]` the triplets'
    `reference_id`; triplets, corpus: the split's HF `datasets.Dataset`s (project schema); similarity: the model's
    scoring rule (None: cosine)."""

    queries: torch.Tensor
    gallery: torch.Tensor
    gallery_ids: list[str]
    reference_ids: list[str]
    triplets: Any
    corpus: Any
    similarity: Similarity | None = None

    def column(self, name: str) -> list:
        return list(self.triplets[name])


@dataclass(frozen=True)
class Protocol:
    """
    One evaluation protocol.

    Attributes:
        name: its key in `PROTOCOLS` (e.g. `"fashioniq_remove_reference"`); description: `PROTOCOLS[name]`.
        benchmark: `"fashioniq"`, `"cirr"`, `"circo"`, or `"recall"` (any other dataset).
        ks: the K of its `@K` metrics; headline: the metric that ranks checkpoints (`metric_for_best_model`).
        remove_reference: each query's reference is deleted from its ranking (metrics, report, submission).
        gallery_scope: `"split"` (every query ranks the whole split's gallery) or `"category"` (FashionIQ: each
            query ranks the corpus images of its own category; metrics per category, then averaged).
        text_mode: how the modification texts become one query text (`trainers.text.compose_text`).
        query_text: how each modification text reads in a query: a format string over `text` (the modification
            text) and the triplet's columns, e.g. `"{shared_concept} {text}"`; see `query_texts`.
        multi_target: the ground truths are the `target_ids` lists (CIRCO), not the single `target_id`.
        metrics: `(protocol, split) -> metrics`; use `protocol.evaluate(split)`.
        submission: `(protocol, split, output_dir, name) -> paths` of the test-server files, or None (no server
            format); use `protocol.write_submission(...)`.
    """

    name: str
    description: str
    benchmark: str
    ks: tuple[int, ...]
    headline: str
    remove_reference: bool
    gallery_scope: str
    text_mode: str
    multi_target: bool
    metrics: Callable[[Protocol, EncodedSplit], dict[str, float]]
    submission: Callable[[Protocol, EncodedSplit, Path, str], tuple[Path, ...]] | None = None
    query_text: str = "{text}"

    def __post_init__(self):
        if self.gallery_scope not in GALLERY_SCOPES:
            raise ValueError(f"Protocol {self.name!r}: gallery_scope must be one of {GALLERY_SCOPES}, got "
                             f"{self.gallery_scope!r}.")

    def evaluate(self, split: EncodedSplit) -> dict[str, float]:
        """The protocol's metrics (percent, unprefixed keys) on a split whose triplets have targets."""
        return self.metrics(self, split)

    def write_submission(self, split: EncodedSplit, output_dir: str | Path, name: str = "") -> tuple[Path, ...]:
        """Write the test-server files of a split without targets into `output_dir` (`name`: their suffix)."""
        if self.submission is None:
            raise ValueError(f"Protocol {self.name!r} has no test-server format: evaluate a split with targets.")
        return self.submission(self, split, Path(output_dir), name)

    def galleries(self, split: EncodedSplit) -> list[tuple[str | None, list[int], list[int]]]:
        """Each gallery the queries are ranked against: `(label, query rows, gallery rows)`, rows indexing
        `split.queries` and `split.gallery`. Scope `"split"`: one unlabelled gallery, everything; `"category"`:
        one per query category (sorted), its corpus images in corpus order."""
        if self.gallery_scope == "split":
            return [(None, list(range(len(split.reference_ids))), list(range(len(split.gallery_ids))))]
        position = {image_id: i for i, image_id in enumerate(split.gallery_ids)}
        rows_of: dict[str, dict[int, None]] = {}
        for image_id, category in zip(split.corpus["image_id"], split.corpus["category"]):
            rows_of.setdefault(category, {}).setdefault(position[image_id], None)
        categories = split.column("category")
        return [(c, [i for i, q in enumerate(categories) if q == c], list(rows_of.get(c, {})))
                for c in sorted(set(categories))]

    def query_galleries(self, split: EncodedSplit) -> list[list[int]] | None:
        """Per query, the gallery rows it is ranked against; None when every query ranks the whole gallery."""
        if self.gallery_scope == "split":
            return None
        allowed: list[list[int]] = [[] for _ in split.reference_ids]
        for _, queries, gallery in self.galleries(split):
            for q in queries:
                allowed[q] = gallery
        return allowed

    def query_texts(self, triplets) -> list[list[str]]:
        """Each triplet's `modification_texts` as this protocol reads them: `query_text` filled with each text and
        the triplet's columns (a column the triplets lack is an error naming it)."""
        texts = list(triplets["modification_texts"])
        if self.query_text == "{text}":
            return texts
        fields = [f for _, f, _, _ in string.Formatter().parse(self.query_text) if f and f != "text"]
        missing = [f for f in fields if f not in triplets.column_names]
        if missing:
            raise ValueError(f"Protocol {self.name!r} builds its query text {self.query_text!r} from the triplets' "
                             f"column(s) {missing}, which they lack (columns: {triplets.column_names}); convert the "
                             f"dataset again (datasets_scripts.{self.benchmark} keeps them), or pick another protocol.")
        columns = {f: list(triplets[f]) for f in fields}
        return [[self.query_text.format(text=t, **{f: columns[f][i] for f in fields}) for t in row]
                for i, row in enumerate(texts)]

    def ground_truths(self, triplets) -> list[list[str]]:
        """Per query, its ground-truth target ids (empty where a test split has none)."""
        if self.multi_target and "target_ids" in triplets.column_names:
            return [list(t or []) for t in triplets["target_ids"]]
        singles = triplets["target_id"] if "target_id" in triplets.column_names else [None] * len(triplets)
        return [[t] if t else [] for t in singles]


# ------------------------------------------------------------------- metric functions on a split
def _per_category_recall(protocol: Protocol, split: EncodedSplit) -> dict[str, float]:
    """FashionIQ: `{category}_recall@K` per category gallery, then `fashioniq_average`'s three numbers."""
    targets = split.column("target_id")
    results, per_category = {}, {}
    for category, queries, gallery in protocol.galleries(split):
        metrics = fashioniq_metrics(
            split.queries[queries], split.gallery[gallery], [split.gallery_ids[g] for g in gallery],
            [split.reference_ids[i] for i in queries], [targets[i] for i in queries],
            remove_reference=protocol.remove_reference, similarity=split.similarity,
        )
        per_category[category] = metrics
        results |= {f"{category}_{k}": v for k, v in metrics.items()}
    return results | fashioniq_average(per_category)


def _cirr(protocol: Protocol, split: EncodedSplit) -> dict[str, float]:
    return cirr_metrics(split.queries, split.gallery, split.gallery_ids, split.reference_ids,
                        split.column("target_id"), split.column("group_members"), similarity=split.similarity)


def _circo(protocol: Protocol, split: EncodedSplit) -> dict[str, float]:
    """mAP@K, and the CIRCO authors' Recall@K of `target_id` and mAP@10 per `semantic_aspects` where the triplets
    have those columns."""
    columns = split.triplets.column_names
    targets = split.column("target_id") if "target_id" in columns else None
    return circo_metrics(split.queries, split.gallery, split.gallery_ids, split.reference_ids,
                         split.column("target_ids"), similarity=split.similarity,
                         remove_reference=protocol.remove_reference,
                         target_ids=targets if targets is not None and None not in targets else None,
                         semantic_aspects=split.column("semantic_aspects") if "semantic_aspects" in columns else None)


def _recall(protocol: Protocol, split: EncodedSplit) -> dict[str, float]:
    return recall_metrics(split.queries, split.gallery, split.gallery_ids, split.reference_ids,
                          split.column("target_id"), protocol.ks, protocol.remove_reference,
                          similarity=split.similarity)


def _cirr_submission(protocol: Protocol, split: EncodedSplit, output_dir: Path, name: str) -> tuple[Path, ...]:
    return write_cirr_submission(split.queries, split.gallery, split.gallery_ids, split.reference_ids,
                                 split.column("query_id"), split.column("group_members"), output_dir,
                                 name=name or "spn4cir", similarity=split.similarity)


def _circo_submission(protocol: Protocol, split: EncodedSplit, output_dir: Path, name: str) -> tuple[Path, ...]:
    return (write_circo_submission(split.queries, split.gallery, split.gallery_ids, split.reference_ids,
                                   split.column("query_id"), output_dir / f"circo_{name or 'test'}.json",
                                   split.similarity, remove_reference=protocol.remove_reference),)


# ---------------------------------------------------------------------------------------- the protocols
def _kept_and_removed(name: str, kept: str, removed: str, **rules) -> tuple[Protocol, Protocol]:
    """A benchmark where deleting the reference is a choice: `name` keeps it, `{name}_remove_reference` deletes it."""
    return (Protocol(name, kept, remove_reference=False, **rules),
            Protocol(f"{name}_remove_reference", removed, remove_reference=True, **rules))


FASHIONIQ, FASHIONIQ_REMOVE_REFERENCE = _kept_and_removed(
    "fashioniq",
    kept="FashionIQ val, category gallery = split.{cat}.val.json, reference kept in the ranking (CLIP4Cir / TG-CIR / "
    "BLIP4CIR / SPRC protocol)",
    removed="FashionIQ val, category gallery = split.{cat}.val.json, reference removed from the ranking (SPN4CIR "
    "CLIP4CIR protocol)",
    benchmark="fashioniq", ks=FASHIONIQ_KS, headline="average", gallery_scope="category", text_mode="join",
    multi_target=False, metrics=_per_category_recall,
)
CIRR = Protocol(
    "cirr", "CIRR rc2, gallery = all images of the split, reference removed; subset = group members minus the "
    "reference", benchmark="cirr", ks=CIRR_RECALL_KS, headline="average", remove_reference=True,
    gallery_scope="split", text_mode="choice", multi_target=False, metrics=_cirr, submission=_cirr_submission)
CIRCO, CIRCO_REMOVE_REFERENCE = _kept_and_removed(
    "circo",
    kept="CIRCO, gallery = COCO unlabeled2017, mAP@K with AP@K = sum P@i rel(i) / min(|GT|, K), reference kept in "
    "the ranking (the CIRCO authors' code)",
    removed="CIRCO, gallery = COCO unlabeled2017, mAP@K with AP@K = sum P@i rel(i) / min(|GT|, K), reference "
    "removed from the ranking",
    benchmark="circo", ks=CIRCO_KS, headline="map@10", gallery_scope="split", text_mode="choice", multi_target=True,
    metrics=_circo, submission=_circo_submission,
)
# BGE-VL reports CIRCO with the shared concept in the query text. Its exact join is not published with the numbers:
# here the shared concept, one space, the relative caption.
_SHARED_CONCEPT = ("CIRCO, query text = \"{shared_concept} {relative_caption}\" (the shared concept, a space, the "
                   "relative caption, as BGE-VL reports CIRCO), gallery = COCO unlabeled2017, mAP@K with AP@K = sum "
                   "P@i rel(i) / min(|GT|, K), reference ")
CIRCO_SHARED_CONCEPT, CIRCO_SHARED_CONCEPT_REMOVE_REFERENCE = _kept_and_removed(
    "circo_shared_concept", kept=_SHARED_CONCEPT + "kept in the ranking", removed=_SHARED_CONCEPT + "removed from the "
    "ranking", benchmark="circo", ks=CIRCO_KS, headline="map@10", gallery_scope="split", text_mode="choice",
    multi_target=True, metrics=_circo, submission=_circo_submission, query_text="{shared_concept} {text}",
)
RECALL = Protocol(
    "recall", "Recall@K over the split's gallery, reference removed", benchmark="recall", ks=CIRR_RECALL_KS,
    headline="recall@10", remove_reference=True, gallery_scope="split", text_mode="choice", multi_target=False,
    metrics=_recall)

_BY_NAME = {p.name: p for p in (FASHIONIQ, FASHIONIQ_REMOVE_REFERENCE, CIRR, CIRCO, CIRCO_REMOVE_REFERENCE,
                                 CIRCO_SHARED_CONCEPT, CIRCO_SHARED_CONCEPT_REMOVE_REFERENCE, RECALL)}
# The published name -> description table (results and model cards quote these strings).
PROTOCOLS = {name: p.description for name, p in _BY_NAME.items()}


def get_protocol(name: str) -> Protocol:
    """The protocol called `name` (a key of `PROTOCOLS`)."""
    if name not in _BY_NAME:
        raise ValueError(f"Unknown evaluation protocol {name!r}; choose one of {sorted(_BY_NAME)}.")
    return _BY_NAME[name]


def protocol_for(dataset: str, remove_reference: bool = False) -> Protocol:
    """
    The protocol that scores `dataset`: a protocol's own name, an official benchmark (`fashioniq`, `cirr`,
    `circo`: its protocol), or anything else (the generic `recall`).

    `remove_reference=True` picks the benchmark's variant that deletes the reference from each ranking where there
    is one (`fashioniq` -> `fashioniq_remove_reference`, `circo` -> `circo_remove_reference`,
    `circo_shared_concept` -> `circo_shared_concept_remove_reference`); CIRR and `recall` always delete it.
    """
    protocol = _BY_NAME.get(dataset) or _BY_NAME[default_protocol(dataset)]
    if remove_reference and not protocol.remove_reference:
        protocol = next(p for p in _BY_NAME.values() if p.benchmark == protocol.benchmark and p.remove_reference
                        and p.query_text == protocol.query_text)
    return protocol
