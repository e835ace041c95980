"""The zoo's model cards: the paper's reported metrics (and measured ones) as `model-index` entries, provenance and
evaluation protocol, then the family converter's own card."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from datasets_scripts.paper_triplets import SHORT_NAME
from modeling_spn4cir.families import family
from modeling_spn4cir.model_cards import (
    card_data,
    cir_card_data,
    eval_results,
    metrics_table,
    render_card,
    table,
    usage,
)

from .paper import (
    BENCHMARK,
    PAPER,
    PAPER_URL,
    REPORTED_NOTE,
    SOURCE_REPO,
    original_codes,
    reported_metrics,
    reported_protocol,
    zero_shot_references,
)
from .release import ZooModel, model_id


def _eval_results(family_name, dataset, stage, measured, reported: bool):
    """The `model-index` entries: the paper's numbers (`reported`: only for a checkpoint with the paper's backbone)
    and the measured ones, each naming its protocol."""
    name, dataset_type, split, table_name = BENCHMARK[dataset]
    note = REPORTED_NOTE[stage].format(method=family(family_name).paper.method)
    protocol = reported_protocol(family_name, dataset, stage).name
    return (eval_results(reported_metrics(family_name, dataset, stage) if reported else {}, dataset_type, name, split,
                         protocol, label="reported", verified=False, source_url=PAPER_URL,
                         source_name=f"reported in the SPN paper, {table_name}, {note}")
            + eval_results(measured or {}, dataset_type, name, "val", protocol, label="measured", verified=False))


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


def _training(model: ZooModel) -> tuple[str, str, str]:
    """(base model, training data, stage) rows of the card."""
    paper = family(model.family).paper
    name = BENCHMARK[model.dataset][0]
    short = SHORT_NAME[model.dataset]
    backbone = paper.backbone if model.paper_backbone else f"image tower {model.backbone} (from the weights)"
    if model.stage == 1:
        return (backbone, f"{name} train triplets (annotated), trained by the {paper.method} authors",
                f"1: the {paper.method} authors' fine-tuning, the starting point of SPN's stage 2")
    return (f"`{model_id(replace(model, stage=1))}` ({paper.method} stage 1), {backbone}",
            f"{name} train triplets + the SPN generated triplets of `{paper.release_folder}` (`--plus`, dataset "
            f"`spn4cir-{short}-scaled-triplets-{paper.release_folder}`), candidate bank de-duplicated with "
            "`optimized_images.json`",
            "2: SPN's candidate-bank stage (scaling negatives; image side frozen, query side trained)")


def model_card(model: ZooModel, conversion_card: str, measured: dict | None = None,
               namespace: str | None = None, license: str | None = None) -> str:
    """The zoo card: YAML front matter with `model-index` (the paper's numbers when the checkpoint has the paper's
    backbone; measured ones when given), the Hub ids of the stage-1 base and the generated-triplet dataset (with
    `namespace`) and the release's `license`, then base model, training data, stage, provenance and protocol, usage,
    and the family converter's own card."""
    family_name, dataset, stage = model.family, model.dataset, model.stage
    model_name = model.directory.name
    paper = family(family_name).paper
    method = paper.method
    name, _, _, table_name = BENCHMARK[dataset]
    short = SHORT_NAME[dataset]
    repo = f"{namespace}/{model_name}" if namespace else model_name
    stage1_id = model_id(replace(model, stage=1))
    metadata = cir_card_data(
        model_name=model_name, tags=[family_name, f"stage-{stage}"],
        base_model=f"{namespace}/{stage1_id}" if stage == 2 and namespace else None,
        datasets=[f"{namespace}/spn4cir-{short}-scaled-triplets-{paper.release_folder}"]
        if stage == 2 and namespace else None,
        license=license or "unknown",
        eval_results=_eval_results(family_name, dataset, stage, measured, model.paper_backbone),
    )
    base, data, stage_text = _training(model)
    reported = (f"{REPORTED_NOTE[stage].format(method=method)} ({table_name}; `model-index` entries `(reported)`)"
                if model.paper_backbone else
                f"none: the paper reports {method} with {paper.backbone} ({paper.backbone_label}) only; this "
                f"checkpoint's image tower is {model.backbone}")
    rows = [("base model", base), ("training data", data), ("stage", stage_text), ("reported metrics", reported),
            ("evaluation protocol", _protocol(family_name, dataset, stage)),
            ("source", f"`{SOURCE_REPO}`: `{Path(model.entry.path).as_posix()}`, sha256 `{model.sha256}`, format "
                       f"`{model.source_format}`"),
            ("conversion", f"`python examples/convert_paper_checkpoints.py` (the `modeling_spn4cir.{family_name}` "
                           "converter)"),
            ("license", f"`{license}`, the license of the `{SOURCE_REPO}` release" if license
             else f"unknown: the `{SOURCE_REPO}` release's card names none")]
    intro = (f"{paper.method} {'+SPN ' if stage == 2 else ''}trained on {name}, converted from the SPN authors' "
             f"release (`{SOURCE_REPO}` on the Hub) into a `transformers` model. Paper: {PAPER} ({PAPER_URL}).")
    measured_text = ("Measured metrics (val split of the local benchmark, `trainers.evaluation.CIREvaluator`, the "
                     "protocol above) are in the `model-index` next to the reported ones, labelled `(measured)`."
                     if measured else "Not re-measured here: the `model-index` holds the reported numbers only.")
    if measured:
        measured_text += f"\n\n{metrics_table(measured)}"
    body = re.sub(r"\A---\n.*?\n---\n", "", conversion_card, flags=re.DOTALL)
    body = re.sub(r"^## Usage\n\n```python\n.*?\n```\n?", "", body, flags=re.DOTALL | re.MULTILINE)  # ours below
    body = re.sub(r"^# ", "### ", body, flags=re.MULTILINE)
    return render_card(metadata, model_name, intro, table(rows), measured_text, usage(repo),
                       f"## Conversion details\n{body}")


def release_license(snapshot_dir: str | Path) -> str | None:
    """The license the release's own card (README.md at its root) declares, if any."""
    return card_data(snapshot_dir).get("license")


def zero_shot_section() -> str:
    """The model card section a model trained on generated triplets only carries: the zero-shot rows to compare it
    with (the SPN paper's and other methods'), reported numbers, never re-measured."""
    lines = ["## Zero-shot references (reported, not measured here)", "",
             ("Trained on generated triplets only, this model is a zero-shot CIR model (SPN's low-resource setting). "
              "Published zero-shot numbers, in percent, to compare its metrics with (same benchmark and split only):"),
             "", "| row | benchmark | reported | source |", "|---|---|---|---|"]
    for ref in zero_shot_references():
        metrics = ", ".join(f"{key} {value:.2f}" for key, value in ref["metrics"].items())
        lines.append(f"| {ref['row']} | {ref['benchmark']} | {metrics} | {ref['source']} |")
    return "\n".join(lines)


__all__ = ["model_card", "release_license", "zero_shot_section"]
