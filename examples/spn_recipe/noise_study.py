"""Diagnostic `--caption_noise_study`: +P and +P+N with scene-graph captions of the pool, a share of their phrases
replaced by wrong ones, against the default run's stage 1 and +N (docs/reproduction.md: caption quality vs. gain)."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

from datasets_scripts.captioners import ColumnCaptioner
from datasets_scripts.synthetic import scene_captions
from modeling_spn4cir.storage import atomic_write_json

from .captions import pairing_encoder, pool_precision
from .config import NOISE_LEVELS, RecipeConfig, say
from .lanes import Step, one_thread_per_lane, run_steps
from .recipe import run_default_recipe
from .report import pyplot
from .stamps import STAGE0, cache_name, finished, stamp
from .steps import RecipeRun
from .training import load_model


def run_caption_noise_study(cfg: RecipeConfig, levels=NOISE_LEVELS) -> dict:
    """+P and +P+N at each corruption level of `levels`, paired like the default's +P. Reuses the default run in
    `output_dir` (runs it first if absent); writes OUTPUT_DIR/noise_study/results.json and
    caption_noise_study.png. With `cfg.workers > 1` the levels are shared among that many lanes (processes, one
    thread each); each finished level is kept (`point.json`), so an interrupted study resumes level by level."""
    out = Path(cfg.output_dir)
    if finished(out / "results.json", cfg):
        say(f"caption noise study: reusing the default run in {out}")
    elif finished(out / STAGE0, cfg):  # a default run of this config got past stage 0 (or is still running)
        say(f"caption noise study: reusing stage 0 of the default run in {out}")
    else:
        run_default_recipe(cfg)
    start = time.perf_counter()
    run = RecipeRun(cfg)
    pending = [level for level in levels if not finished(_point(out, level), cfg)]
    lanes = max(1, min(cfg.workers, len(pending)))
    with one_thread_per_lane(lanes > 1):
        run_steps(noise_steps(run, pending), [[_level_name(v) for v in pending[i::lanes]] for i in range(lanes)],
                  in_processes=lanes > 1, exchange_dir=out / "noise_study" / "lanes",
                  lane_steps=partial(_lane_noise_steps, cfg, tuple(pending)))
    points = [finished(_point(out, level), cfg)["point"] for level in levels]
    summary = _write_noise_study(run, points, time.perf_counter() - start)
    print("\nCaption noise study (test R@10; scene-graph captions with a share of phrases replaced by wrong ones)\n")
    print("| phrases corrupted | caption precision | +P R@10 | +P+N R@10 |\n|---|---|---|---|")
    for row in points:
        print(f"| {100 * row['corrupted']:.0f}% | {row['phrase_precision']:.1f}% | {row['+P']['recall@10']:.2f} | "
              f"{row['+P+N']['recall@10']:.2f} |")
    print("reference: " + ", ".join(f"{r} {v['recall@10']:.2f}" for r, v in summary["reference"].items()))
    say(f"wrote {out / 'noise_study' / 'results.json'} and {out / 'caption_noise_study.png'}")
    return summary


def _level_name(level: float) -> str:
    return f"corrupt_{round(100 * level):02d}"


def _point(out: Path, level: float) -> Path:
    return out / "noise_study" / _level_name(level) / "point.json"


def noise_steps(run: RecipeRun, levels) -> list[Step]:
    return [Step(_level_name(level), partial(noise_level, run, level)) for level in levels]


def _lane_noise_steps(cfg: RecipeConfig, levels) -> list[Step]:
    return noise_steps(RecipeRun(replace(cfg, show_progress_bar=False), quiet=True), levels)


def noise_level(run: RecipeRun, level: float) -> dict:
    """+P and +P+N with the pool's scene-graph captions, `level` of their phrases corrupted; written to the
    level's `point.json`."""
    name = f"noise_study/{_level_name(level)}"
    mapping = scene_captions(dict(zip(run.pool["image_id"], run.pool["scene"])), corrupt=level, seed=run.cfg.seed)
    captions = run.captioned(ColumnCaptioner(mapping=mapping), run.out / name / f"captions_{cache_name(mapping)}")
    scaled = run.scaled(captions, f"{name}/generated", run.rank_window(),
                        pairing_encoder(run.out, run.processor, run.tokenizer))
    train = run.with_annotated(scaled.triplets)
    row = {"corrupted": level, **pool_precision(run.pool, scaled.captions),
           "+P": run.scored("stage0", "in_batch", train, f"{name}/P")}
    row["+P+N"] = run.scored(f"{name}/P", "candidate_bank", train, f"{name}/PN")
    stamp(run.out / name / "point.json", run.cfg, point=row)
    say(f"{_level_name(level)}: caption precision {row['phrase_precision']:.1f}%, +P R@10 "
        f"{row['+P']['recall@10']:.2f}, +P+N R@10 {row['+P+N']['recall@10']:.2f}")
    return row


def _write_noise_study(run: RecipeRun, points: list[dict], seconds: float) -> dict:
    """The study's results.json and plot."""
    cfg, out = run.cfg, run.out
    default = finished(out / "results.json", cfg)  # read now: a default run may have finished meanwhile
    if default:
        reference = {r: default["results"][r] for r in ("stage 1", "+N", "+P", "+P+N")}
        default_captioner = {"name": default["config"]["captioner"],
                             "precision": default["caption_precision"][default["config"]["captioner"]]}
    else:
        reference = {r: run.evaluator(load_model(out / d)) for r, d in (("stage 1", "stage1"), ("+N", "stage2_N"))
                     if (out / d / "model.safetensors").exists()}
        default_captioner = None
    summary = {"points": points, "reference": reference, "default_captioner": default_captioner,
               "seconds": round(seconds, 1), "config": asdict(cfg)}
    atomic_write_json(out / "noise_study" / "results.json", summary, indent=2)
    plot_noise_study(summary, out / "caption_noise_study.png")
    return summary


def plot_noise_study(summary: dict, path: Path) -> None:
    """R@10 of +P and +P+N against caption precision, stage 1 and +N as horizontal lines, and the default run's
    captioner as two marked points."""
    plt = pyplot()
    points = sorted(summary["points"], key=lambda r: r["phrase_precision"])
    x = [r["phrase_precision"] for r in points]
    fig, ax = plt.subplots(figsize=(6, 4.8))
    for row, colour in (("+P", "tab:orange"), ("+P+N", "tab:red")):
        ax.plot(x, [r[row]["recall@10"] for r in points], marker="o", color=colour,
                label=f"{row} (scene-graph captions, corrupted)")
    for row, colour in (("stage 1", "tab:blue"), ("+N", "tab:green")):
        if row in summary["reference"]:
            ax.axhline(summary["reference"][row]["recall@10"], color=colour, linestyle="--", label=row)
    default = summary["default_captioner"]
    for row, marker in (("+P", "s"), ("+P+N", "D")) if default else ():
        ax.plot([default["precision"]["phrase_precision"]], [summary["reference"][row]["recall@10"]], marker=marker,
                color="black", linestyle="none", label=f"{row}, default run's {default['name']} captioner")
    ax.set_xlabel("caption precision (% of phrases naming an object of the image exactly)", fontsize=9)
    ax.set_ylabel("test R@10 (%)")
    ax.set_title("Caption quality vs. scaling positives (synthetic CIR)", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)  # below the axes
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
