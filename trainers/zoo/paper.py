"""What the SPN paper reports, per family (`FamilySpec.paper`) and per benchmark: the numbers the zoo's model cards
carry, the stage-2 tau of each released checkpoint, and the evaluation protocol of the reported numbers."""

from __future__ import annotations

from modeling_spn4cir.families import FAMILIES, family

from ..evaluation import Protocol, protocol_for

PAPER = ("Feng et al., Improving Composed Image Retrieval via Contrastive Learning with Scaling Positives and "
         "Negatives (ACM MM 2024)")
PAPER_URL = "https://arxiv.org/abs/2404.11317"
SOURCE_REPO = "BUAADreamer/SPN4CIR"
# The order of `PaperFacts.reported`: the paper's Table 2 (FashionIQ val) and Table 3 (CIRR test, evaluation
# server) columns, keyed like `CIREvaluator`'s metrics.
METRIC_KEYS = {
    "fashioniq": ("dress_recall@10", "dress_recall@50", "shirt_recall@10", "shirt_recall@50", "toptee_recall@10",
                  "toptee_recall@50", "average_recall@10", "average_recall@50", "average"),
    "cirr": ("recall@1", "recall@5", "recall@10", "recall@50", "recall_subset@1", "recall_subset@2",
             "recall_subset@3", "average"),
}
REPORTED_NOTE = {
    2: "the paper's \"{method} +SPN\" row: this checkpoint's results as reported by the SPN authors, not re-measured",
    1: "the paper's \"{method}\" row: the base method as reported (its full pipeline, which may include a further "
       "stage such as a Combiner that this stage-1 checkpoint does not have), not re-measured",
}
BENCHMARK = {"fashioniq": ("FashionIQ", "fashioniq", "val", "Table 2"), "cirr": ("CIRR", "cirr", "test", "Table 3")}


# Zero-shot CIR methods of other papers, for comparison with a model trained on generated triplets only (SPN's
# zero-shot setting): as BGE-VL's zero-shot table prints them (CIRCO test mAP@5, CIRR test R@1, FashionIQ val mean
# R@10), keyed like `CIREvaluator`'s metrics. Not methods of this package.
ZERO_SHOT_BASELINES = {
    "Pic2Word": {"circo": {"map@5": 8.7}, "cirr": {"recall@1": 23.9}, "fashioniq": {"average_recall@10": 24.7}},
    "SEARLE (CLIP ViT-L/14)": {"circo": {"map@5": 11.7}, "cirr": {"recall@1": 24.2},
                               "fashioniq": {"average_recall@10": 25.6}},
}
ZERO_SHOT_BASELINES_SOURCE = "BGE-VL's zero-shot table (MegaPairs, Zhou et al. 2024), CIRCO and CIRR test, FashionIQ val"


def zero_shot_references() -> list[dict]:
    """The zero-shot rows to compare a zero-shot model with: the SPN paper's (every family's
    `PaperFacts.zero_shot`) and the other methods' (`ZERO_SHOT_BASELINES`), one dict per (row, benchmark):
    `{"row", "benchmark", "metrics", "source"}`, all labelled as reported, never measured here."""
    rows = []
    for spec in FAMILIES.values():
        for setting, benchmarks in (spec.paper.zero_shot.items() if spec.paper else ()):
            rows += [{"row": f"{setting}, {spec.title}", "benchmark": name, "metrics": dict(metrics),
                      "source": f"{PAPER}: {spec.paper.zero_shot_source}"} for name, metrics in benchmarks.items()]
    for method, benchmarks in ZERO_SHOT_BASELINES.items():
        rows += [{"row": method, "benchmark": name, "metrics": dict(metrics), "source": ZERO_SHOT_BASELINES_SOURCE}
                 for name, metrics in benchmarks.items()]
    return rows


def reported_metrics(family_name: str, dataset: str, stage: int) -> dict[str, float]:
    """The paper's numbers for a (family, benchmark, stage), keyed like `CIREvaluator`'s metrics."""
    return dict(zip(METRIC_KEYS[dataset], family(family_name).paper.reported[(dataset, stage)]))


def reported_protocol(family_name: str, dataset: str, stage: int) -> Protocol:
    """The evaluation protocol of the reported numbers. On FashionIQ, SPN's CLIP4CIR code removes the reference
    from the ranking, every other code (CLIP4Cir's stage 1 included) keeps it (`PaperFacts.removes_reference`)."""
    removed = (dataset, stage) in family(family_name).paper.removes_reference
    return protocol_for(dataset, remove_reference=removed)


def original_codes() -> str:
    """`"CLIP4Cir / TG-CIR / BLIP4CIR / SPRC"`: the authors' evaluation code of every family with paper facts."""
    return " / ".join(spec.paper.original_code for spec in FAMILIES.values() if spec.paper is not None)


def default_tokenizers() -> dict[str, str | None]:
    """family -> the Hub tokenizer of its released checkpoints (`FamilySpec.default_tokenizer`)."""
    return {name: spec.default_tokenizer for name, spec in FAMILIES.items()}


def stage2_temperature(family_name: str, dataset: str) -> dict:
    """`{"temperature": tau}` of SPN's README train command for the family on `dataset`; `{}` where the converter
    reads it from the checkpoint (BLIP4CIR, SPRC)."""
    taus = family(family_name).paper.stage2_temperature
    return {"temperature": taus[dataset]} if dataset in taus else {}


__all__ = ["BENCHMARK", "METRIC_KEYS", "PAPER", "PAPER_URL", "REPORTED_NOTE", "SOURCE_REPO", "ZERO_SHOT_BASELINES",
           "default_tokenizers", "original_codes", "reported_metrics", "reported_protocol", "stage2_temperature",
           "zero_shot_references"]
