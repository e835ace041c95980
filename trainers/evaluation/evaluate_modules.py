"""What the bundled `evaluate` metric scripts (`trainers/metrics/<name>/<name>.py`, see `trainers.metric_path`)
share: their `MetricInfo`. The scripts hold only their inputs and call the metric functions of this package."""

from __future__ import annotations

import datasets
import evaluate


def metric_info(description: str, citation: str, inputs_description: str,
                references_are_lists: bool = False) -> evaluate.MetricInfo:
    """`predictions[i]`: ranked gallery ids; `references[i]`: the target id, or (`references_are_lists`, CIRCO)
    the list of ground-truth ids."""
    ids = datasets.Sequence(datasets.Value("string"))
    return evaluate.MetricInfo(
        description=description,
        citation=citation,
        inputs_description=inputs_description,
        features=datasets.Features(
            {"predictions": ids, "references": ids if references_are_lists else datasets.Value("string")}
        ),
    )
