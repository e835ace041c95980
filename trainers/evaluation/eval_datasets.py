"""One model evaluated on several benchmarks in one run (`run_cir.py --eval_datasets NAME=PATH ...`), each with its own
protocol, metrics prefixed by the entry's name: e.g. a zero-shot model trained on generated triplets only, scored on
FashionIQ, CIRR and CIRCO.

    entries = parse_eval_datasets(["fashioniq_remove_reference=fashionIQ_dataset", "cirr=CIRR", "circo=CIRCO"])
    evaluator = SequentialEvaluator([CIREvaluator(..., name=e.name, protocol=e.protocol) for e in entries])
    evaluator(model)   # {"fashioniq_remove_reference_average": ..., "cirr_average": ..., "circo_map@10": ...}

An entry's NAME says how PATH is read and scored: a benchmark (`fashioniq`, `cirr`, `circo`: PATH is its official
layout or its converted directory, scored by its own protocol), a protocol's name (`PROTOCOLS`, e.g.
`fashioniq_remove_reference`, `circo_shared_concept`: its benchmark at PATH, scored by that protocol), or any other
label (PATH is a dataset in the project schema, scored by `recall`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from datasets_scripts.load import BENCHMARKS, CIRData, is_project_dataset, load_cir_data

from .protocols import PROTOCOLS, Protocol, get_protocol, protocol_for

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_KINDS = (f"a benchmark ({', '.join(BENCHMARKS)}; PATH its official layout or converted directory), a protocol "
          f"name ({', '.join(PROTOCOLS)}; its benchmark at PATH, scored by that protocol), or a label of your own "
          "(PATH a dataset in the project schema, scored by recall)")


class EvalDatasetError(ValueError):
    """An `--eval_datasets` entry that names no benchmark or dataset; the message names the entry and the fix."""


@dataclass(frozen=True)
class EvalDataset:
    """One `--eval_datasets` entry: `name` (the metrics' prefix), `path`, and the `protocol` that scores it."""

    name: str
    path: str
    protocol: Protocol

    @property
    def entry(self) -> str:
        return f"{self.name}={self.path}"

    def load(self, split: str, cache_dir: str | None = None) -> CIRData:
        """The dataset at `path` (a benchmark converted once, as `load_cir_data`), checked to hold `split`'s
        triplets and corpus."""
        benchmark = self.protocol.benchmark
        try:
            data = (load_cir_data(benchmark, self.path, cache_dir) if benchmark in BENCHMARKS
                    else load_cir_data(self.path))
        except (FileNotFoundError, ValueError) as error:
            raise EvalDatasetError(f"--eval_datasets {self.entry}: {self.path} does not read as "
                                   f"{_as_what(self.protocol)}: {error}") from error
        if split not in data.triplets or split not in data.corpus:
            raise EvalDatasetError(
                f"--eval_datasets {self.entry}: it has no {split!r} split to evaluate (triplets: "
                f"{sorted(data.triplets) or 'none'}, corpus: {sorted(data.corpus)}); an image collection or a set of "
                "generated triplets is training data, not a benchmark. Pass --eval_split, or another dataset.")
        return data


def _as_what(protocol: Protocol) -> str:
    if protocol.benchmark in BENCHMARKS:
        return f"{protocol.benchmark} (its official layout, or a directory converted by datasets_scripts)"
    return "a dataset in the project schema"


def parse_eval_datasets(entries: Sequence[str]) -> list[EvalDataset]:
    """The `--eval_datasets` entries `NAME=PATH` (see the module docstring), checked before any model is loaded:
    a malformed entry, a repeated name, or a label of your own whose PATH is not a dataset in the project schema
    (an official layout named by no benchmark, a folder of images) is an [`EvalDatasetError`] naming the fix."""
    parsed, seen = [], set()
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise EvalDatasetError(f"--eval_datasets {entry!r}: expected NAME=PATH, NAME {_KINDS}.")
        if not _LABEL.match(name):
            raise EvalDatasetError(f"--eval_datasets {entry!r}: the name {name!r} prefixes the metrics "
                                   "(eval_<name>_...); use letters, digits, '_', '.' or '-'.")
        if name in seen:
            raise EvalDatasetError(f"--eval_datasets names {name!r} twice: give each entry a name of its own.")
        seen.add(name)
        if name in BENCHMARKS or name in PROTOCOLS:
            protocol = protocol_for(name) if name in BENCHMARKS else get_protocol(name)
            if protocol.benchmark in BENCHMARKS and not Path(path).exists():
                raise EvalDatasetError(f"--eval_datasets {entry}: {path} does not exist; pass the {protocol.benchmark} "
                                       "official layout or its converted directory.")
        else:
            protocol = get_protocol("recall")
            local = Path(path)
            if local.exists() and not is_project_dataset(local):
                raise EvalDatasetError(
                    f"--eval_datasets {entry}: {name!r} is not a benchmark, and {path} is not a dataset in the project "
                    f"schema (no README.md with a corpus and a triplets config). NAME must be {_KINDS}: e.g. "
                    f"fashioniq={path} for FashionIQ's official layout, or convert your data first "
                    "(python -m datasets_scripts.custom).")
        parsed.append(EvalDataset(name, path, protocol))
    return parsed


class SequentialEvaluator:
    """
    Several [`CIREvaluator`]s, each with a `name`, run one after the other on the same model (sentence-transformers'
    `SequentialEvaluator`): their metrics in one dict, each prefixed by its evaluator's name.

    Args:
        evaluators: `CIREvaluator`s with distinct, non-empty names.
        primary_metric: the metric that ranks checkpoints (e.g. `"fashioniq_average"`); default: the first
            evaluator's headline.
    """

    def __init__(self, evaluators: Sequence, primary_metric: str | None = None):
        names = [e.name for e in evaluators]
        if not evaluators or not all(names) or len(set(names)) != len(names):
            raise ValueError(f"SequentialEvaluator needs evaluators with distinct, non-empty names; got {names}.")
        self.evaluators = list(evaluators)
        self.primary_metric = primary_metric or self.evaluators[0].primary_metric
        self.check_metric(self.primary_metric)

    @property
    def headlines(self) -> list[str]:
        """Each evaluator's headline metric, prefixed (`["fashioniq_average", "cirr_average", "circo_map@10"]`)."""
        return [e.primary_metric for e in self.evaluators]

    def check_metric(self, metric: str) -> None:
        """`metric` (with or without `eval_`) must belong to one of the evaluators (its name as prefix)."""
        bare = metric.removeprefix("eval_")
        if not any(bare.startswith(f"{e.name}_") for e in self.evaluators):
            raise ValueError(f"metric_for_best_model {metric!r} belongs to none of the evaluation datasets "
                             f"{[e.name for e in self.evaluators]}: name one of their metrics, e.g. "
                             f"{', '.join(self.headlines)}.")

    @property
    def protocol_description(self) -> str:
        return "; ".join(f"{e.name}: {e.protocol_description}" for e in self.evaluators)

    @property
    def protocols(self) -> dict[str, str]:
        """`{name: protocol description}` of each evaluator."""
        return {e.name: e.protocol_description for e in self.evaluators}

    @property
    def triplets(self):
        """The first evaluator's triplets (the `Trainer` wants an `eval_dataset`; the evaluators own the real ones)."""
        return self.evaluators[0].triplets

    def use_bank(self, bank) -> None:
        """Every evaluator reuses the stage-2 candidate bank's rows for the gallery images it holds."""
        for evaluator in self.evaluators:
            evaluator.use_bank(bank)

    def __call__(self, model) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for evaluator in self.evaluators:
            metrics |= evaluator(model)
        return metrics


__all__ = ["EvalDataset", "EvalDatasetError", "SequentialEvaluator", "parse_eval_datasets"]
