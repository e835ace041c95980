"""The zoo's model cards: the paper's reported metrics (and measured ones) as `model-index` entries, provenance and
evaluation protocol, then the family converter's own card."""

from __future__ import annotations

import re
from pathlib import Path

from datasets_scripts.paper_triplets import SHORT_NAME
from modeling_spn4cir.families import family
from modeling_spn4cir.model_cards import USAGE, render_card, table

from .paper import (
    BENCHMARK,
    PAPER,
    PAPER_URL,
    REPORTED_NOTE,
    SOURCE_REPO,
    original_codes,
    reported_metrics,
    reported_protocol,
)


def _eval_results(family_name, dataset, stage, measured):
    from huggingface_hub import EvalResult

    name, dataset_type, split, table_name = BENCHMARK[dataset]
    note = REPORTED_NOTE[stage].format(method=family(family_name).paper.method)
    results = [
        EvalResult(task_type="image-retrieval", task_name="Composed image retrieval", dataset_type=dataset_type,
                   dataset_name=name, dataset_split=split, metric_type=key, metric_value=value,
                   metric_name=f"{key} (reported)", verified=False,
                   source_name=f"reported in the SPN paper, {table_name}, {note}", source_url=PAPER_URL)
        for key, value in reported_metrics(family_name, dataset, stage).items()
    ]
    results += [
        EvalResult(task_type="image-retrieval", task_name="Composed image retrieval", dataset_type=dataset_type,
                   dataset_name=name, dataset_split="val", metric_type=key, metric_value=round(float(value), 4),
                   metric_name=f"{key} (measured)", verified=False)
        for key, value in (measured or {}).items() if isinstance(value, (int, float))
    ]
    return results


def _protocol(family_name: str, dataset: str, stage: int) -> str:
    """The evaluation protocol of the reported numbers, in words."""
    if dataset != "fashioniq":
        return ("CIRR rc2: reported numbers are on test1 (evaluation server), measured ones on val; gallery = every "
                "image of the split, reference removed; subset = group members minus the reference; average = "
                "(R@5 + Rs@1) / 2")
    removed = reported_protocol(family_name, dataset, stage).remove_reference
    code = f"SPN4CIR {family(family_name).paper.method}" if removed else original_codes()
    return (f"FashionIQ val, per-category gallery (`split.{{cat}}.val.json`), reference "
            f"{'removed from' if removed else 'kept in'} the ranking ({code} code); "
            "average = (mean R@10 + mean R@50) / 2")


def _training(family_name: str, dataset: str, stage: int) -> tuple[str, str, str]:
    """(base model, training data, stage) rows of the card."""
    paper = family(family_name).paper
    name, short = BENCHMARK[dataset][0], SHORT_NAME[dataset]
    if stage == 1:
        return (paper.backbone, f"{name} train triplets (annotated), trained by the {paper.method} authors",
                f"1: the {paper.method} authors' fine-tuning, the starting point of SPN's stage 2")
    return (f"`spn4cir-{family_name}-{short}-stage1` ({paper.method} stage 1, released by its authors), "
            f"{paper.backbone}",
            f"{name} train triplets + the SPN generated triplets of `{paper.release_folder}` (`--plus`, dataset "
            f"`spn4cir-{short}-scaled-triplets-{paper.release_folder}`), candidate bank de-duplicated with "
            "`optimized_images.json`",
            "2: SPN's candidate-bank stage (scaling negatives; image side frozen, query side trained)")


def model_card(model_id: str, family_name: str, dataset: str, stage: int, source: Path, sha256: str,
               source_format: str, conversion_card: str, measured: dict | None = None,
               namespace: str | None = None) -> str:
    """The zoo card: YAML front matter with `model-index` (reported, and measured when given), then base model,
    training data, stage, provenance and protocol, then the family converter's own card."""
    from huggingface_hub import ModelCardData

    method = family(family_name).paper.method
    name, _, _, table_name = BENCHMARK[dataset]
    stage1_id = f"spn4cir-{family_name}-{SHORT_NAME[dataset]}-stage1"
    metadata = ModelCardData(
        model_name=model_id, library_name="transformers",
        tags=["composed-image-retrieval", "spn4cir", family_name, f"stage-{stage}"],
        base_model=f"{namespace}/{stage1_id}" if stage == 2 and namespace else None,
        eval_results=_eval_results(family_name, dataset, stage, measured),
    )
    base, data, stage_text = _training(family_name, dataset, stage)
    rows = [("base model", base), ("training data", data), ("stage", stage_text),
            ("reported metrics", f"{REPORTED_NOTE[stage].format(method=method)} ({table_name}; `model-index` entries "
                                 "`(reported)`)"),
            ("evaluation protocol", _protocol(family_name, dataset, stage)),
            ("source", f"`{SOURCE_REPO}`: `{source.as_posix()}`, sha256 `{sha256}`, format `{source_format}`"),
            ("conversion", f"`python examples/convert_paper_checkpoints.py` (the `modeling_spn4cir.{family_name}` "
                           "converter)")]
    intro = (f"{method} {'+SPN ' if stage == 2 else ''}trained on {name}, converted from the SPN authors' release "
             f"(`{SOURCE_REPO}` on the Hub) into a `transformers` model. Paper: {PAPER} ({PAPER_URL}).")
    measured_text = ("Measured metrics (val split of the local benchmark, `trainers.evaluation.CIREvaluator`, the "
                     "protocol above) are in the `model-index` next to the reported ones, labelled `(measured)`."
                     if measured else "Not re-measured here: the `model-index` holds the reported numbers only.")
    body = re.sub(r"^# ", "### ", re.sub(r"\A---\n.*?\n---\n", "", conversion_card, flags=re.S), flags=re.M)
    return render_card(metadata, model_id, intro, table(rows), measured_text, USAGE, f"## Conversion details\n{body}")


__all__ = ["model_card"]
