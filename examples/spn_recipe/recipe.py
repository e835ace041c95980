"""The embedded default: SPN's whole recipe on the synthetic compositional benchmark, from one command, on a CPU.

    accelerate launch examples/run_cir.py            # = run_default_recipe(RecipeConfig())

`recipe_steps` lists the eight steps of docs/reproduction.md, in order:

1. build (or reuse) the benchmark (`datasets_scripts.synthetic`);
2. a small CLIP4CIR built from a config, with a word-level tokenizer trained on the benchmark's text;
3. stage 0: image-caption contrastive warm-up, standing in for CLIP's pre-training (not part of SPN);
4. stage 1: in-batch CIR fine-tuning on the annotated triplets;
5. the captioner, standing in for the paper's LLaVA: a tiny LLaVA trained only on the separate captioned
   `pretrain` corpus (`generative_captioner.py`), used through `MLLMCaptioner` (processor, chat template,
   `generate`); its held-out caption quality is reported;
6. positive scaling: the captioner captions the unlabeled pool (the scene graph only scores the captions; the
   stage-1 model's retrieval captions over the phrase vocabulary are scored next to them), pairs images in a rank
   window and fills the templates (and, for zero-shot, pairs the pool at random);
7. stage 2 on the candidate bank: +N, and +N with LoRA adapters;
8. the paper's ablation on the test split: stage 1, +N (stage 2 on annotated), +N (LoRA), +P (stage 1 with
   generated positives), +P+N, and zero-shot (stage 1 then stage 2 on generated triplets only) — a table,
   `results.json`, a recall-at-K plot and a retrieval report of the best row.

`RecipeConfig.workers=2` (the default) runs the same steps in two lanes (`lanes.run_steps`, `recipe_lanes`);
`workers=1` in one process, in this order. The diagnostics (`--seeds`, `--caption_noise_study`,
`--text_form_probe`, `--oracle_captions`, `--captioner retrieval`) are `cli.py`'s.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import datasets
import torch

from modeling_spn4cir.storage import atomic_write_json
from modeling_spn4cir.loading import load_cir_model_and_processor
from trainers.evaluation import PROTOCOLS, CIREvaluator

from .config import MODEL_DIRS, ROWS, RecipeConfig, say
from .lanes import Step, StepsRun, one_thread_per_lane, run_steps
from .report import format_table, plot_recall_at_k, precision_line
from .stamps import clear_stage_stamps
from .steps import RecipeRun


def recipe_steps(run: RecipeRun) -> list[Step]:
    """The eight steps of docs/reproduction.md, in order (1 and the tokenizer of 2 are `RecipeRun`'s); each step
    names the steps whose values it takes (`needs`) and whose models it loads (`after`)."""
    captioned_after = "stage 1" if run.cfg.captioner == "retrieval" else "captioner"
    return [
        Step("stage 0", run.stage0),                                                          # 2, 3
        Step("stage 1", run.stage1, after=("stage 0",)),                                      # 4
        Step("captioner", run.train_captioner),                                               # 5
        Step("pool captions", run.caption_pool, after=(captioned_after,)),                    # 6
        Step("positive scaling", run.positive_scaling, ("pool captions",), after=("stage 0",)),
        Step("zero-shot triplets", run.zero_shot_triplets, ("pool captions",)),
        Step("+N", run.plus_n, after=("stage 1",)),                                           # 7
        Step("+N (LoRA)", run.plus_n_lora, after=("stage 1",)),
        Step("+P", run.plus_p, ("positive scaling",), after=("stage 0",)),                    # 8
        Step("+P+N", run.plus_p_n, ("positive scaling",), after=("+P",)),
        Step("zero-shot", run.zero_shot, ("zero-shot triplets",), after=("stage 0",)),
        Step("caption precision", run.caption_precision, ("pool captions",), after=("stage 1",)),
    ]


def recipe_lanes(cfg: RecipeConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The two lanes (docs/reproduction.md: Time), each in its order:

        first lane:  stage 0 ------------------> [captions] rank-window triplets -> +P -> +P+N
        second lane: captioner -> pool captions + zero-shot triplets -> [stage 0] stage 1 -> +N -> +N (LoRA)
                     -> zero-shot -> caption precision

    The retrieval captioner is the stage-1 model: then stage 1 comes before the pool's captions."""
    if cfg.captioner == "retrieval":
        captions = ("captioner", "stage 1", "pool captions", "zero-shot triplets")
    else:
        captions = ("captioner", "pool captions", "zero-shot triplets", "stage 1")
    first = ("stage 0", "positive scaling", "+P", "+P+N")
    return first, captions + ("+N", "+N (LoRA)", "zero-shot", "caption precision")


def _lane_recipe_steps(cfg: RecipeConfig) -> list[Step]:
    """The steps, built again in the second lane's own process (no progress bars there)."""
    return recipe_steps(RecipeRun(replace(cfg, show_progress_bar=False), quiet=True))


def run_default_recipe(cfg: RecipeConfig | None = None) -> dict:
    """The whole recipe: the eight steps of docs/reproduction.md (`recipe_steps`), in two lanes with
    `cfg.workers >= 2`."""
    cfg = cfg or RecipeConfig()
    start, cpu_start = time.perf_counter(), time.process_time()
    with one_thread_per_lane(cfg.workers > 1):
        if not cfg.show_progress_bar:
            datasets.disable_progress_bars()
        clear_stage_stamps(Path(cfg.output_dir))
        run = RecipeRun(cfg)                                                                  # 1, 2
        benchmark_seconds = round(time.perf_counter() - start, 1)
        if cfg.captioner == "oracle":
            say("DIAGNOSTIC: captions come from the scene graph (oracle), not from a model")
        if cfg.workers > 1:
            say("starting a second lane beside this one (one thread each): captioner, stage 1, +N, zero-shot")
        done = run_steps(recipe_steps(run), recipe_lanes(cfg), in_processes=cfg.workers > 1,  # 2-8
                         exchange_dir=run.out / "lanes", lane_steps=partial(_lane_recipe_steps, cfg))
        done.seconds["first lane"] = {"benchmark": benchmark_seconds, **done.seconds["first lane"]}
        return write_results(run, done, start, cpu_start)                                     # 8


def write_results(run: RecipeRun, done: StepsRun, start: float, cpu_start: float) -> dict:
    """Step 8's outputs: the table, `results.json`, the recall-at-K plot, and a retrieval report of the best row."""
    cfg, out, values = run.cfg, run.out, done.values
    results = {row: values[row] for row in ROWS}
    report_start = time.perf_counter()
    best = retrieval_report(run, results)
    done.seconds["first lane"]["retrieval report"] = round(time.perf_counter() - report_start, 1)
    elapsed = time.perf_counter() - start
    captions = values["pool captions"]
    summary = {
        "protocol": PROTOCOLS["recall"] + " (synthetic benchmark, test split)",
        "results": results,
        "caption_precision": values["caption precision"],
        "captioner": captions["description"],
        "captioner_heldout": values["captioner"],
        "generated_triplets": len(values["positive scaling"]),
        "zero_shot_triplets": len(values["zero-shot triplets"]["triplets"]),
        "zero_shot_data": {k: v for k, v in values["zero-shot triplets"].items() if k != "triplets"},
        "annotated_triplets": len(run.annotated),
        "seconds": round(elapsed, 1),
        "seconds_by_step": done.seconds,  # per lane (they run at once when workers > 1)
        # CPU time of this process's threads (the first lane only): on a shared machine wall time says little
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "threads_per_lane": torch.get_num_threads(),
        "retrieval_report": {"model": best, "html": str(out / "retrieval_report" / "retrieval_report.html")},
        "config": asdict(cfg),
    }
    atomic_write_json(out / "results.json", summary, indent=2)
    plot_recall_at_k(results, out / "recall_at_k.png")
    print("\nSPN ablation on the synthetic benchmark (test split; " + summary["protocol"] + ")\n")
    print(format_table(results))
    print("\nCaptions of the unlabeled pool (" + captions["description"] + "):")
    for name, value in summary["caption_precision"].items():
        print("  " + precision_line(name, value))
    say(f"done in {elapsed / 60:.1f} min; wrote {out / 'results.json'} and {out / 'recall_at_k.png'}")
    return summary


def retrieval_report(run: RecipeRun, results: dict) -> str:
    """A picture of the best row's rankings (reference, text, top 8, the target marked) in
    OUTPUT_DIR/retrieval_report: evaluated once more with a report, which reproduces the row's numbers."""
    best = max(ROWS, key=lambda row: results[row]["recall@10"])
    report = CIREvaluator(run.corpus["test"], run.triplets["test"], run.processor.image_processor, run.processor,
                          protocol="recall", batch_size=256, show_progress_bar=run.cfg.show_progress_bar,
                          report_dir=str(run.out / "retrieval_report"), report_queries=8,
                          split="synthetic benchmark test",
                          model_name=f"the recipe's {best} model ({run.out / MODEL_DIRS[best]})")
    report(load_cir_model_and_processor(str(run.out / MODEL_DIRS[best]))[0])  # a LoRA row loads merged
    return best
