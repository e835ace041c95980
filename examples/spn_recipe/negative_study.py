"""Diagnostic `--negative_study`: SPN's study of negatives on the synthetic benchmark (docs/negatives.md:
the negative study).

- **Negative types** (the paper's Figure 3; `trainers.losses.NegativeTypeLoss`): stage 1 from the stage-0 model with
  each type alone (`target`, `query`, `text`, `reference`) and with `target` plus each other type;
- **Number of negatives**: stage 2 from the stage-1 model (`target`) with each query scored against the batch's
  targets only (`--in_batch_negatives`), 128 and 1000 sampled bank rows (`--num_negatives`; a count at or above the
  bank's size is left out), the whole bank (+N) and the whole bank plus the unlabeled pool as extra negatives
  (`--bank_extra_images`: the train split's images in no annotated triplet).

Every point trains with the default run's settings, once per training seed (`seeds`: the data order and the
sampled negatives; the benchmark and stage 0 stay those of `cfg.seed`), and is scored on the test split. A finished
default run in OUTPUT_DIR gives the points it already trained (stage 1 = `target`, +N = the whole bank, at
`cfg.seed`); without one, only stage 0 is trained first (or reused). Each point's result is kept
(`negative_study/<point>/seed_<s>/point.json`), so an interrupted study resumes point by point; with
`cfg.workers > 1` the points are shared among that many lanes. Writes OUTPUT_DIR/negative_study.json,
negative_types.png and negatives_curve.png.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

from modeling_spn4cir.image_store import ImageStore
from modeling_spn4cir.storage import atomic_write_json
from trainers.bank_extras import ExtraImages
from trainers.candidate_bank import bank_image_ids
from trainers.evaluation import PROTOCOLS

from .config import KS, RecipeConfig, say
from .lanes import Step, one_thread_per_lane, run_steps
from .report import pyplot
from .stamps import STAGE0, finished, stamp
from .steps import RecipeRun

TYPE_ROWS = (("target",), ("query",), ("text",), ("reference",), ("target", "query"), ("target", "text"),
             ("target", "reference"))
SAMPLED = (128, 1000)  # sampled bank rows per query (the original's neg_num)


@dataclass(frozen=True)
class StudyPoint:
    """One trained model of the study: stage 1 with `negative_types`, or stage 2 with `negatives` (`"in-batch"`,
    a number of sampled rows, `"bank"` or `"bank + pool"`)."""

    stage: str
    negative_types: tuple[str, ...] = ("target",)
    negatives: str | int = "bank"

    @property
    def key(self) -> str:
        if self.stage == "in_batch":
            return "types/" + "+".join(self.negative_types)
        return "negatives/" + str(self.negatives).replace(" + ", "+")

    def step_name(self, seed: int) -> str:
        return f"{self.key} seed {seed}"


def study_points(bank_rows: int) -> list[StudyPoint]:
    """The stage-1 rows, then the curve's points that a bank of `bank_rows` images allows."""
    sampled = [n for n in SAMPLED if n < bank_rows - 1]
    return ([StudyPoint("in_batch", types) for types in TYPE_ROWS]
            + [StudyPoint("candidate_bank", negatives=n) for n in ("in-batch", *sampled, "bank", "bank + pool")])


class NegativeStudy:
    """The study in OUTPUT_DIR: its points, where each starts from, and what the default run already holds."""

    def __init__(self, cfg: RecipeConfig, seeds, quiet: bool = False):
        self.run = RecipeRun(cfg, quiet=quiet)
        self.cfg, self.out, self.seeds = cfg, self.run.out, list(seeds)
        self.default = finished(self.out / "results.json", cfg)
        self.bank_rows = len(bank_image_ids([self.run.annotated]))
        self.points = study_points(self.bank_rows)
        self.stage1 = StudyPoint("in_batch")  # what stage 2 starts from, at cfg.seed

    def reused(self, point: StudyPoint, seed: int) -> dict | None:
        """The default run's metrics for `point` at `seed`, where it trained that very model."""
        row = {"types/target": "stage 1", "negatives/bank": "+N"}.get(point.key)
        if self.default is None or row is None or seed != self.cfg.seed:
            return None
        return self.default["results"][row]

    def model_dir(self, point: StudyPoint, seed: int) -> str:
        if self.reused(point, seed) is not None:
            return "stage1" if point.stage == "in_batch" else "stage2_N"
        return f"negative_study/{point.key}/seed_{seed}"

    def bank_dir(self) -> Path:
        return self.out / ("bank_stage1" if self.default is not None else "negative_study/bank")

    def negatives(self, point: StudyPoint) -> int:
        """How many negatives each query of `point` is scored against (stage 1: the global batch's other targets)."""
        if point.stage == "in_batch":
            return self.cfg.stage1_batch_size - 1
        if point.negatives == "in-batch":
            return self.cfg.stage2_batch_size - 1
        if isinstance(point.negatives, int):
            return point.negatives
        return self.bank_rows - 1 + (len(self.run.pool) if point.negatives == "bank + pool" else 0)

    def train_point(self, point: StudyPoint, seed: int) -> dict:
        """Train and score one point (its `point.json`); a reused point is only read."""
        reused = self.reused(point, seed)
        metrics = reused if reused is not None else self._trained_metrics(point, seed)
        row = {"point": point.key, "seed": seed, "negatives": self.negatives(point), "metrics": metrics,
               "reused_from_default_run": reused is not None}
        stamp(self._point_path(point, seed), self.cfg, point=row)
        say(f"{point.step_name(seed)}: {self.negatives(point)} negatives, test R@10 {metrics['recall@10']:.2f}")
        return row

    def _trained_metrics(self, point: StudyPoint, seed: int) -> dict:
        out = self.model_dir(point, seed)
        if point.stage == "in_batch":
            return self.run.scored("stage0", "in_batch", self.run.annotated, out, seed=seed,
                                   negative_types=list(point.negative_types))
        options = {"in-batch": {"in_batch_negatives": True}, "bank": {},
                   "bank + pool": {"extra_negatives": self._pool()}}.get(point.negatives)
        options = {"num_negatives": point.negatives} if options is None else options
        return self.run.scored(self.model_dir(self.stage1, self.cfg.seed), "candidate_bank", self.run.annotated,
                               out, seed=seed, bank_dir=self.bank_dir(), **options)

    def _pool(self) -> ExtraImages:
        """The train split's images; those of no annotated triplet (the unlabeled pool) become negatives."""
        corpus = self.run.train_corpus
        return ExtraImages(ImageStore(corpus), list(corpus["image_id"]), "the synthetic train split")

    def _point_path(self, point: StudyPoint, seed: int) -> Path:
        return self.out / "negative_study" / point.key / f"seed_{seed}" / "point.json"

    def done(self, point: StudyPoint, seed: int) -> dict | None:
        stored = finished(self._point_path(point, seed), self.cfg)
        return stored["point"] if stored else None

    def steps(self, pending: list[tuple[StudyPoint, int]]) -> list[Step]:
        """One step per pending (point, seed); stage 2 waits for the stage-1 model it starts from, when pending."""
        first = (self.stage1, self.cfg.seed)
        after = (self.stage1.step_name(self.cfg.seed),) if first in pending else ()
        ordered = sorted(pending, key=lambda item: item != first)
        return [Step(point.step_name(seed), partial(self.train_point, point, seed),
                     after=after if point.stage == "candidate_bank" else ()) for point, seed in ordered]


def _lane_steps(cfg: RecipeConfig, seeds, pending_keys) -> list[Step]:
    study = NegativeStudy(replace(cfg, show_progress_bar=False), seeds, quiet=True)
    by_key = {(p.key, s): (p, s) for p in study.points for s in study.seeds}
    return study.steps([by_key[key] for key in pending_keys])


def run_negative_study(cfg: RecipeConfig, seeds=None) -> dict:
    """The study (module docstring) for the training `seeds` (default: `cfg.seed` and the next two); returns and
    writes OUTPUT_DIR/negative_study.json and its two plots."""
    seeds = list(seeds) if seeds is not None else [cfg.seed, cfg.seed + 1, cfg.seed + 2]
    start = time.perf_counter()
    with one_thread_per_lane(cfg.workers > 1):
        study = NegativeStudy(cfg, seeds)
        if study.default is not None:
            say(f"negative study: reusing the default run in {study.out} (stage 1 and +N at seed {cfg.seed})")
        elif finished(study.out / STAGE0, cfg):
            say(f"negative study: reusing stage 0 of {study.out}")
        else:
            study.run.stage0()
        pending = [(p, s) for s in seeds for p in study.points if study.done(p, s) is None]
        steps = study.steps(pending)
        lanes = max(1, min(cfg.workers, len(steps)))
        costs = sorted(steps, key=lambda step: "types/" not in step.name)  # stage-1 points cost most: spread them
        run_steps(steps, [[s.name for s in costs[i::lanes]] for i in range(lanes)], in_processes=lanes > 1,
                  exchange_dir=study.out / "negative_study" / "lanes",
                  lane_steps=partial(_lane_steps, cfg, tuple(seeds), tuple((p.key, s) for p, s in pending)))
    summary = summarize(study, time.perf_counter() - start)
    atomic_write_json(study.out / "negative_study.json", summary, indent=2)
    plot_negative_types(summary, study.out / "negative_types.png")
    plot_negatives_curve(summary, study.out / "negatives_curve.png")
    print_summary(summary)
    say(f"wrote {study.out / 'negative_study.json'}, negative_types.png and negatives_curve.png")
    return summary


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarize(study: NegativeStudy, seconds: float) -> dict:
    """Per point, each metric's mean ± std over the seeds (and the seeds' values)."""
    rows = {}
    for point in study.points:
        found = [study.done(point, seed) for seed in study.seeds]
        rows[point.key] = {"stage": point.stage, "negative_types": list(point.negative_types),
                           "negatives": study.negatives(point),
                           "metrics": {f"recall@{k}": _stats([f["metrics"][f"recall@{k}"] for f in found]) for k in KS},
                           "reused_from_default_run": [f["seed"] for f in found if f["reused_from_default_run"]]}
    return {"protocol": PROTOCOLS["recall"] + " (synthetic benchmark, test split)", "seeds": study.seeds,
            "bank_rows": study.bank_rows, "pool_rows": len(study.run.pool),
            "types": {k: v for k, v in rows.items() if v["stage"] == "in_batch"},
            "curve": {k: v for k, v in rows.items() if v["stage"] == "candidate_bank"},
            "seconds": round(seconds, 1), "workers": study.cfg.workers, "config": asdict(study.cfg)}


def _cell(metric: dict) -> str:
    return f"{metric['mean']:.2f} ± {metric['std']:.2f}" if len(metric["values"]) > 1 else f"{metric['mean']:.2f}"


def print_summary(summary: dict) -> None:
    print(f"\nNegative study (test split; seeds {summary['seeds']}; mean ± std over the seeds)\n")
    header = "| {} | negatives | " + " | ".join(f"R@{k}" for k in KS) + " |"
    for part, label in (("types", "stage 1 negative types"), ("curve", "stage 2 negatives")):
        print(header.format(label) + "\n|---|---|" + "---|" * len(KS))
        for key, row in summary[part].items():
            cells = " | ".join(_cell(row["metrics"][f"recall@{k}"]) for k in KS)
            print(f"| {key.split('/', 1)[1]} | {row['negatives']} | {cells} |")
        print()


def plot_negative_types(summary: dict, path: Path) -> None:
    """R@1 and R@10 of each stage-1 negative-type row, mean ± std over the seeds."""
    plt = pyplot()
    rows = list(summary["types"].items())
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.38
    for offset, metric, colour in ((-width / 2, "recall@1", "tab:blue"), (width / 2, "recall@10", "tab:orange")):
        values = [row["metrics"][metric] for _, row in rows]
        ax.bar([i + offset for i in range(len(rows))], [v["mean"] for v in values], width,
               yerr=[v["std"] for v in values], capsize=3, color=colour, label=metric.replace("recall", "R"))
    ax.set_xticks(range(len(rows)), [key.split("/", 1)[1] for key, _ in rows], rotation=20, fontsize=8)
    ax.set_ylabel("test recall (%)")
    ax.set_title(f"Stage-1 negative types (synthetic CIR; seeds {summary['seeds']})", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_negatives_curve(summary: dict, path: Path) -> None:
    """Stage 2's R@1 and R@10 (one panel each) against the number of negatives per query (log scale), mean ± std
    over the seeds: the sampled rows, the bank and the bank + pool as a line, the batch's own targets as a separate
    marker (other negatives, not fewer of the same), stage 1 (`target`) as a dashed line."""
    plt = pyplot()
    curve = summary["curve"]
    line = sorted((row for key, row in curve.items() if key != "negatives/in-batch"), key=lambda r: r["negatives"])
    labels = {row["negatives"]: key.split("/", 1)[1] for key, row in curve.items()}
    stage1 = summary["types"].get("types/target")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric in zip(axes, ("recall@1", "recall@10")):
        x = [row["negatives"] for row in line]
        values = [row["metrics"][metric] for row in line]
        ax.errorbar(x, [v["mean"] for v in values], yerr=[v["std"] for v in values], marker="o", capsize=3,
                    color="tab:orange", label="stage 2: sampled rows, bank, bank + pool")
        for xi, v in zip(x, values):
            ax.annotate(labels[xi], (xi, v["mean"]), fontsize=7, textcoords="offset points", xytext=(0, 7),
                        ha="center")
        if "negatives/in-batch" in curve:
            row = curve["negatives/in-batch"]
            ax.errorbar([row["negatives"]], [row["metrics"][metric]["mean"]], yerr=[row["metrics"][metric]["std"]],
                        marker="s", capsize=3, color="tab:green", linestyle="none",
                        label="stage 2: the batch's targets only")
        if stage1:
            ax.axhline(stage1["metrics"][metric]["mean"], color="tab:blue", linestyle="--", alpha=0.7,
                       label="stage 1 (target)")
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{n:,}" for n in x], fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("negatives per query")
        ax.set_ylabel(f"test {metric.replace('recall', 'R')} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Number of negatives in stage 2 (synthetic CIR; seeds {summary['seeds']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
