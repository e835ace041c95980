"""Diagnostic `--seeds 0 1 2`: the recipe once per seed, then mean ± std per cell (and per captioner precision)."""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

from modeling_spn4cir.storage import atomic_write_json

from .config import RecipeConfig, say
from .recipe import run_default_recipe
from .report import format_table
from .stamps import finished


def aggregate_seeds(summaries: list[dict]) -> dict:
    """Mean and standard deviation (n - 1) over runs, per row and metric, and per captioner precision."""
    def stats(values):
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values}

    rows = {row: {m: stats([s["results"][row][m] for s in summaries]) for m in summaries[0]["results"][row]}
            for row in summaries[0]["results"]}
    precision = {name: {m: stats([s["caption_precision"][name][m] for s in summaries]) for m in ("phrase_precision",
                                                                                                   "colour_shape_precision")}
                 for name in summaries[0]["caption_precision"]}
    # each row minus stage 1 of the same seed: the seed moves the benchmark and every row with it, so the spread of
    # a row says less about a method's effect than the spread of its paired difference
    paired = {row: {m: stats([s["results"][row][m] - s["results"]["stage 1"][m] for s in summaries])
                    for m in summaries[0]["results"][row]}
              for row in summaries[0]["results"] if row != "stage 1" and "stage 1" in summaries[0]["results"]}
    return {"results": rows, "minus_stage_1": paired, "caption_precision": precision,
            "seeds": [s["config"]["seed"] for s in summaries]}


def run_seeds(cfg: RecipeConfig, seeds: list[int]) -> dict:
    """The recipe once per seed (each in OUTPUT_DIR/seed_N; a finished run of the same config is reused), then
    mean ± std per cell in OUTPUT_DIR/seeds.json. The seed sets the benchmark, the initializations and the order."""
    summaries = []
    for seed in seeds:
        run_cfg = replace(cfg, seed=seed, output_dir=str(Path(cfg.output_dir) / f"seed_{seed}"))
        done = finished(Path(run_cfg.output_dir) / "results.json", run_cfg)
        if done:
            say(f"seed {seed}: reusing {run_cfg.output_dir}/results.json")
            summaries.append(done)
        else:
            summaries.append(run_default_recipe(run_cfg))
    aggregate = aggregate_seeds(summaries)
    atomic_write_json(Path(cfg.output_dir) / "seeds.json", aggregate, indent=2)
    print(f"\nSPN ablation, mean ± std over seeds {seeds} (test split)\n")
    print(format_table(aggregate["results"]))
    if aggregate["minus_stage_1"]:
        print(f"\nEach row minus stage 1 of the same seed, mean ± std over seeds {seeds}\n")
        print(format_table(aggregate["minus_stage_1"], rows=list(aggregate["minus_stage_1"])))
    for name, value in aggregate["caption_precision"].items():
        e, c = value["phrase_precision"], value["colour_shape_precision"]
        print(f"  {name} captions: exact {e['mean']:.1f} ± {e['std']:.1f}%, colour + shape "
              f"{c['mean']:.1f} ± {c['std']:.1f}%")
    return aggregate
