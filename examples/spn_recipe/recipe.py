"""The embedded default: SPN's whole recipe on the synthetic compositional benchmark, from one command, on a CPU.

    accelerate launch examples/run_cir.py            # = run_default_recipe(RecipeConfig())

1. build (or reuse) the benchmark (`datasets_scripts.synthetic`);
2. a small CLIP4CIR built from a config, with a word-level tokenizer trained on the benchmark's text;
3. stage 0: image-caption contrastive warm-up, standing in for CLIP's pre-training (not part of SPN);
4. the captioner, standing in for the paper's LLaVA: a tiny LLaVA trained only on the separate captioned
   `pretrain` corpus (`generative_captioner.py`), used through `MLLMCaptioner` (processor, chat template,
   `generate`); its held-out caption quality is reported;
5. stage 1: in-batch CIR fine-tuning on the annotated triplets;
6. positive scaling: the captioner captions the unlabeled pool (the scene graph only scores the captions; the
   stage-1 model's retrieval captions over the phrase vocabulary are scored next to them), pairs images in a rank
   window and fills the templates;
7. stage 2 on the candidate bank;
8. the paper's ablation on the test split: stage 1, +N (stage 2 on annotated), +N (LoRA), +P (stage 1 with
   generated positives), +P+N, and zero-shot (stage 1 then stage 2 on generated triplets only) — a table,
   `results.json` and a recall-at-K plot.

Diagnostics (never part of the default): `--seeds 0 1 2` (mean and std per cell), `--caption_noise_study`
(+P and +P+N with scene-graph captions corrupted at 0/25/50/75 % of phrases, R@10 against caption precision),
`--oracle_captions`, `--captioner retrieval`.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import datasets
import torch

from datasets_scripts.captioners import (
    ColumnCaptioner,
    EmbeddingAdapter,
    RetrievalCaptioner,
)
from datasets_scripts.captioning import captioner_key
from datasets_scripts.common import TRIPLET_FEATURES
from datasets_scripts.positive_scaling import generate_scaled_triplets
from datasets_scripts.synthetic import build_synthetic, phrase_vocabulary, scene_captions
from modeling_spn4cir import (
    CLIP4CIRConfig,
    CLIP4CIRImageProcessor,
    CLIP4CIRModel,
    CLIP4CIRProcessor,
)
from modeling_spn4cir.storage import atomic_write_json
from modeling_spn4cir.loading import load_cir_model_and_processor
from trainers.cir_trainer import CIRTrainer, CIRTrainingArguments
from trainers.evaluation import PROTOCOLS, CIREvaluator

from .generative_captioner import CaptionerConfig, caption_precision, load_captioner, train_generative_captioner
from .tokenizer import train_word_tokenizer
from .warmup import image_text_warmup

TRIPLET_COLUMNS = list(TRIPLET_FEATURES)  # the schema's core columns, shared by every source
KS = (1, 5, 10, 50)
ROWS = ("stage 1", "+N", "+N (LoRA)", "+P", "+P+N", "zero-shot")
MODEL_DIRS = {"stage 1": "stage1", "+N": "stage2_N", "+N (LoRA)": "stage2_N_lora", "+P": "stage1_P",
              "+P+N": "stage2_PN", "zero-shot": "zero_shot"}
CAPTIONERS = ("generative", "retrieval", "oracle")
NOISE_LEVELS = (0.0, 0.25, 0.5, 0.75)


@dataclass
class RecipeConfig:
    output_dir: str = "outputs/spn_recipe"
    size: str = "default"  # benchmark size: "default" or "tiny"
    seed: int = 0
    temperature: float = 0.05
    stage0_epochs: int = 16
    stage0_lr: float = 1e-3
    stage1_epochs: int = 6
    stage1_lr: float = 2e-4
    stage1_batch_size: int = 64
    stage2_epochs: int = 3
    stage2_lr: float = 1e-4
    stage2_batch_size: int = 128
    # "+N (LoRA)": stage 2 with rank-r adapters on the text tower (same epochs and batch as +N); adapters usually
    # want a larger learning rate than full fine-tuning.
    lora_r: int = 8
    lora_lr: float = 1e-3
    rank_window: tuple[float, float] = (0.4, 0.8)  # fractions of the pool, like 10k-20k of FashionIQ's ~25k images
    k: int = 1  # generated targets per pool image: the original's generation commands all use k=1
    caption_phrases: int = 2  # phrases per retrieved caption
    # Who captions the pool for +P, +P+N and zero-shot: "generative" (the tiny LLaVA trained on `pretrain`, the
    # default), "retrieval" (the stage-1 model over the phrase vocabulary) or "oracle" (diagnostic only: the scene
    # graph, i.e. perfect captions).
    captioner: str = "generative"
    captioner_config: dict = field(default_factory=dict)  # overrides of generative_captioner.CaptionerConfig
    oracle_captions: bool = False  # the same as captioner="oracle"
    show_progress_bar: bool = True
    # 2: the captioner lane runs in a second process beside the CIR lane, one thread each (`run_default_recipe`);
    # 1: one process, the steps in sequence (torch's own thread count)
    workers: int = 2
    model_sizes: dict = field(default_factory=lambda: dict(hidden=128, layers=4, text_layers=3, heads=4, patch=16))

    @classmethod
    def tiny(cls, output_dir: str, **kw) -> "RecipeConfig":
        """A ~1 minute run for tests: tiny benchmark, a couple of epochs per stage."""
        base = dict(output_dir=output_dir, size="tiny", stage0_epochs=2, stage1_epochs=2, stage2_epochs=1,
                    stage1_batch_size=16, stage2_batch_size=32,
                    model_sizes=dict(hidden=32, layers=2, text_layers=2, heads=2, patch=16),
                    captioner_config=dict(hidden=32, heads=2, vision_layers=1, text_layers=1, patch=16, epochs=1,
                                          batch_size=16, heldout=40))
        base.update(kw)
        return cls(**base)

    def __post_init__(self):
        if self.oracle_captions:
            self.captioner = "oracle"
        if self.captioner not in CAPTIONERS:
            raise ValueError(f"captioner must be one of {CAPTIONERS}, got {self.captioner!r}.")


def _say(message: str) -> None:
    import multiprocessing

    name = multiprocessing.current_process().name
    print(f"[spn-recipe{'' if name == 'MainProcess' else ' ' + name}] {message}", flush=True)


def build_model(tokenizer, cfg: RecipeConfig) -> CLIP4CIRModel:
    m = cfg.model_sizes
    config = CLIP4CIRConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=m["hidden"], intermediate_size=2 * m["hidden"],
                         num_hidden_layers=m["text_layers"], num_attention_heads=m["heads"],
                         max_position_embeddings=tokenizer.model_max_length, projection_dim=m["hidden"],
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id),
        vision_config=(
            dict(model_type="clip4cir_resnet", layers=m["resnet_layers"], width=m["resnet_width"], image_size=64,
                 projection_dim=m["hidden"])
            if m.get("tower") == "resnet" else
            dict(hidden_size=m["hidden"], intermediate_size=2 * m["hidden"], num_hidden_layers=m["layers"],
                 num_attention_heads=m["heads"], image_size=64, patch_size=m["patch"], projection_dim=m["hidden"])
        ),
        projection_dim=m["hidden"], fusion="sum", temperature=cfg.temperature,
    )
    torch.manual_seed(cfg.seed)
    return CLIP4CIRModel(config)


def _benchmark(cfg: RecipeConfig, quiet: bool = False) -> Path:
    path = Path(cfg.output_dir) / "benchmark"
    manifest = {"seed": cfg.seed, "size": cfg.size, "generator": "datasets_scripts.synthetic v1"}
    stamp = path / "recipe_manifest.json"
    if stamp.exists() and json.loads(stamp.read_text()) == manifest:
        _say(f"reusing the benchmark in {path}") if not quiet else None
    else:
        build_synthetic(path, cfg.seed, cfg.size, overwrite=True)  # the recipe's own earlier benchmark only
        atomic_write_json(stamp, manifest)
        _say(f"built the benchmark in {path}")
    return path


def _train(model, processor, cfg: RecipeConfig, stage: str, train, corpus, out: Path,
           lora_r: int | None = None, bank_dir: Path | None = None) -> CLIP4CIRModel:
    """One CIRTrainer run. `bank_dir`: where stage 2's candidate bank is kept; two runs from the same stage-1
    model over the same images share one (the bank is fingerprinted, so it is reused only when it matches)."""
    epochs, lr, batch = ((cfg.stage1_epochs, cfg.stage1_lr, cfg.stage1_batch_size) if stage == "in_batch"
                         else (cfg.stage2_epochs, cfg.stage2_lr, cfg.stage2_batch_size))
    if lora_r is not None:
        lr = cfg.lora_lr
    args = CIRTrainingArguments(
        output_dir=str(out), stage=stage, num_train_epochs=epochs, learning_rate=lr, per_device_train_batch_size=batch,
        per_device_eval_batch_size=256, warmup_steps=0, weight_decay=0.01, lr_scheduler_type="linear",
        logging_strategy="epoch", save_strategy="no", report_to=[], seed=cfg.seed, data_seed=cfg.seed,
        disable_tqdm=not cfg.show_progress_bar, use_cpu=True, bank_dir=str(bank_dir or out / "bank"),
        dataloader_drop_last=True, lora_r=lora_r,
        cache_images=stage == "in_batch",  # exact; each epoch would otherwise decode and resize every image again
    )
    trainer = CIRTrainer(model, args, train_dataset=train, corpus=corpus, processor=processor,
                         model_card_info={"base_model": "config (synthetic recipe)", "datasets": "synthetic CIR"})
    result = trainer.train()
    trainer.save_model(str(out))
    _say(f"{out.name}: {stage}, {len(train)} triplets, {epochs} epochs, final loss "
         f"{trainer.state.log_history[-2].get('loss', result.training_loss):.3f}")
    return model


def _load(path: Path) -> CLIP4CIRModel:
    return CLIP4CIRModel.from_pretrained(path)


def _pool_precision(corpus, captions: dict[str, str]) -> dict[str, float]:
    """`caption_precision` of the captions of `corpus`'s images against their scene graphs."""
    ids = [i for i in corpus["image_id"] if i in captions]
    scenes = dict(zip(corpus["image_id"], corpus["scene"]))
    return caption_precision([captions[i] for i in ids], [scenes[i] for i in ids])


def _retrieval_captions(captioner, pool, batch_size: int = 256) -> dict[str, str]:
    captions = {}
    for start in range(0, len(pool), batch_size):
        batch = pool[start:start + batch_size]
        captions.update(zip(batch["image_id"], captioner({"image": batch["image"]})))
    return captions


def _plot(results: dict, path: Path, rows=ROWS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for row in rows:
        ax.plot(KS, [results[row][f"recall@{k}"] for k in KS], marker="o", label=row)
    ax.set_xscale("log")
    ax.set_xticks(KS, [str(k) for k in KS])
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_title("SPN ablation, synthetic CIR (test)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(results: dict, rows=ROWS) -> str:
    """A markdown table; a cell is a number, or `{"mean", "std"}` (several seeds), printed as mean ± std."""
    def cell(value) -> str:
        return f"{value['mean']:.2f} ± {value['std']:.2f}" if isinstance(value, dict) else f"{value:.2f}"

    lines = ["| model | " + " | ".join(f"R@{k}" for k in KS) + " |", "|---|" + "---|" * len(KS)]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(cell(results[row][f"recall@{k}"]) for k in KS) + " |")
    return "\n".join(lines)


def _precision_line(name: str, p: dict) -> str:
    return (f"{name}: {p['phrase_precision']:.1f}% of phrases name an object of the scene exactly, "
            f"{p['colour_shape_precision']:.1f}% by colour + shape ({p['object_recall']:.1f}% of objects named)")


def _prepare(cfg: RecipeConfig, quiet: bool = False) -> dict:
    """The benchmark, the CLIP4CIR tokenizer and processor, the test evaluator and the annotated triplets."""
    out = Path(cfg.output_dir)
    bench = _benchmark(cfg, quiet)
    triplets = datasets.load_dataset(str(bench), "triplets")
    corpus = datasets.load_dataset(str(bench), "corpus")
    texts = (list(corpus["pretrain"]["caption"]) + [t for ts in triplets["train"]["modification_texts"] for t in ts]
             + phrase_vocabulary() + ["instead of", "unlike , i want"])
    tokenizer = train_word_tokenizer(texts, model_max_length=48)
    processor = CLIP4CIRProcessor(image_processor=CLIP4CIRImageProcessor(preprocessing="resize", size=64),
                                  tokenizer=tokenizer)
    evaluator = CIREvaluator(corpus["test"], triplets["test"], processor.image_processor, tokenizer, protocol="recall",
                             batch_size=256, show_progress_bar=cfg.show_progress_bar)
    return dict(out=out, triplets=triplets, corpus=corpus, tokenizer=tokenizer, processor=processor,
                evaluator=evaluator, annotated=triplets["train"].select_columns(TRIPLET_COLUMNS))


def _unlabeled_pool(train_corpus, annotated):
    used = set(annotated["reference_id"]) | set(annotated["target_id"])
    return train_corpus.select([i for i, image_id in enumerate(train_corpus["image_id"]) if image_id not in used])


def _generate(cfg: RecipeConfig, pool, captioner, adapter, tokenizer, out: Path, cache: Path, rank_window="config"):
    """Generated triplets of `pool`: pairs in `cfg.rank_window` (fractions of the pool), or at random with
    `rank_window=None`; returns them, `{image_id: caption}` and the window in images."""
    n = len(pool)
    window = (max(1, int(cfg.rank_window[0] * n)), int(cfg.rank_window[1] * n)) if rank_window == "config" else None
    generated_dir = generate_scaled_triplets(
        pool, captioner, out, encoder=adapter, dataset="cirr", rank_window=window, k=cfg.k, seed=cfg.seed,
        tokenizer=tokenizer, max_length=tokenizer.model_max_length, batch_size=256, caption_cache_dir=cache,
        show_progress_bar=cfg.show_progress_bar, overwrite=True,
    )
    generated = datasets.load_dataset(str(generated_dir), "triplets", split="train")
    generated_corpus = datasets.load_dataset(str(generated_dir), "corpus", split="train")
    return generated, dict(zip(generated_corpus["image_id"], generated_corpus["caption"])), window


STAGE0_STAMP, STAGES_STAMP = "stage0.json", "stages.json"  # stage 0 / stages 0 and 1 of this config are done


def _config_key(cfg: RecipeConfig) -> dict:
    """What determines a run's models (JSON types): the config without where it is written or how it reports."""
    return json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k not in ("output_dir", "show_progress_bar")}))


def _finished(path: Path, cfg: RecipeConfig) -> dict | None:
    """The stamp at `path` if it was written by a run of the same config, else None."""
    if path.exists():
        stored = json.loads(path.read_text())
        if {k: v for k, v in stored["config"].items() if k not in ("output_dir", "show_progress_bar")} == _config_key(cfg):
            return stored
    return None


def _cache_name(manifest) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _wait(event, lane=None) -> None:
    """Wait for the other lane's `event`; fail (never hang) if that lane has died."""
    import multiprocessing

    while not event.wait(2):
        if lane is not None and not lane.is_alive():
            raise RuntimeError(f"The recipe's second lane stopped (exit code {lane.exitcode}) before it was done; "
                               "its traceback is printed above.")
        parent = multiprocessing.parent_process()
        if lane is None and parent is not None and not parent.is_alive():
            raise SystemExit("The recipe's main process has gone; this lane stops too.")


def _lane_process(cfg: RecipeConfig) -> RecipeConfig:
    """Set up a lane's own process: one thread, like the other lane; no progress bars interleaved with its."""
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    return replace(cfg, show_progress_bar=False)


def _lap_clock():
    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - clock[0], 1)
        clock[0] = now

    return timings, lap


def _second_lane(cfg: RecipeConfig, stage0_done, captions_done, result_path: str | None = None) -> dict:
    """The recipe's second lane (see `run_default_recipe`): the captioner; the pool's captions, shared with the
    first lane through the caption cache, and the zero-shot triplets; after stage 0: stage 1, +N, +N (LoRA), the
    zero-shot row, and the captions' precision (the stage-1 model's retrieval captions are scored next to them).
    Returns (or writes to `result_path`, in its own process) its rows, precisions and timings."""
    if result_path is not None:
        cfg = _lane_process(cfg)
    timings, lap = _lap_clock()
    prep = _prepare(cfg, quiet=True)
    out, processor, tokenizer, annotated = prep["out"], prep["processor"], prep["tokenizer"], prep["annotated"]
    train_corpus, pretrain = prep["corpus"]["train"], prep["corpus"]["pretrain"]
    pool = _unlabeled_pool(train_corpus, annotated)
    rows: dict = {}

    def evaluate(row: str, m) -> None:
        rows[row] = prep["evaluator"](m)
        _say(f"{row}: test " + ", ".join(f"R@{k} {rows[row][f'recall@{k}']:.2f}" for k in KS))

    def stage1() -> None:
        _wait(stage0_done)
        lap("waiting for stage 0")
        model = _train(_load(out / "stage0"), processor, cfg, "in_batch", annotated, train_corpus, out / "stage1")
        atomic_write_json(out / STAGES_STAMP, {"config": _config_key(cfg)}, indent=1)  # stages 0 and 1 of this config
        evaluate("stage 1", model)
        lap("stage 1")

    captioner_summary = None
    if cfg.captioner == "generative":
        _say("captioner: a tiny LLaVA trained only on the 'pretrain' captions (a stand-in for the paper's LLaVA), "
             "used through MLLMCaptioner (processor, chat template, generate)")
        captioner_summary = train_generative_captioner(pretrain, out / "captioner",
                                                       CaptionerConfig(**cfg.captioner_config), cfg.seed,
                                                       show_progress_bar=cfg.show_progress_bar)
        _say(_precision_line(f"captioner on {CaptionerConfig(**cfg.captioner_config).heldout} held-out 'pretrain' "
                             f"images", captioner_summary["heldout"]))
        lap("captioner training")
    if cfg.captioner == "retrieval":  # the stage-1 model is the captioner: it comes first
        stage1()
    captioner, description = _pool_captioner(cfg, pool, out, processor, tokenizer)
    # zero-shot data as the original's in-domain ZS-CIR: unlabeled images paired at random (zscir, `--model zs`);
    # captioning the pool here fills the cache that the first lane's rank-window triplets read
    zero_shot, captions, _ = _generate(cfg, pool, captioner, None, tokenizer, out / "generated_zero_shot",
                                       _caption_cache(cfg, captioner), rank_window=None)
    captions_done.set()
    lap("captioning the pool + zero-shot triplets")
    if "stage 1" not in rows:
        stage1()
    stage1_bank = out / "bank_stage1"  # +N and +N (LoRA): the same frozen stage-1 towers over the same images
    evaluate("+N", _train(_load(out / "stage1"), processor, cfg, "candidate_bank", annotated, train_corpus,
                          out / "stage2_N", bank_dir=stage1_bank))
    lap("+N")
    evaluate("+N (LoRA)", _train(_load(out / "stage1"), processor, cfg, "candidate_bank", annotated, train_corpus,
                                 out / "stage2_N_lora", lora_r=cfg.lora_r, bank_dir=stage1_bank))
    lap("+N (LoRA)")
    # zero-shot (SPN's low-resource setting): no annotated triplet at all, stage 1 then stage 2 on generated ones
    zero_shot = zero_shot.select_columns(TRIPLET_COLUMNS).cast(annotated.features)
    _train(_load(out / "stage0"), processor, cfg, "in_batch", zero_shot, train_corpus, out / "zero_shot_stage1")
    evaluate("zero-shot", _train(_load(out / "zero_shot_stage1"), processor, cfg, "candidate_bank", zero_shot,
                                 train_corpus, out / "zero_shot"))
    lap("zero-shot")
    precision = {cfg.captioner: _pool_precision(pool, captions)}
    if cfg.captioner != "retrieval":  # the stage-1 model's retrieval captions, scored for comparison only
        precision["retrieval"] = _pool_precision(pool, _retrieval_captions(
            _retrieval_captioner(cfg, out, processor, tokenizer), pool))
    for name, value in precision.items():
        _say(_precision_line(f"{name} captions of the pool", value))
    lap("caption precision")
    result = {"rows": rows, "precision": precision, "captioner_summary": captioner_summary,
              "description": description, "zero_shot_triplets": len(zero_shot), "timings": timings}
    if result_path is not None:
        atomic_write_json(Path(result_path), result, indent=1)
    return result


def _pool_captioner(cfg: RecipeConfig, pool, out: Path, processor, tokenizer):
    """Who captions the unlabeled pool (`cfg.captioner`), and a description of it for the results."""
    if cfg.captioner == "oracle":
        return (ColumnCaptioner(mapping=scene_captions(dict(zip(pool["image_id"], pool["scene"])))),
                "oracle scene-graph captions (diagnostic)")
    if cfg.captioner == "retrieval":
        return (_retrieval_captioner(cfg, out, processor, tokenizer),
                f"retrieval over the phrase vocabulary with the stage-1 model, top {cfg.caption_phrases}")
    captioner = load_captioner(out / "captioner")  # where the second lane's train_generative_captioner saved it
    return captioner, ("tiny LLaVA (CLIP vision + Llama) trained on the 'pretrain' captions, through MLLMCaptioner: "
                       f"'{captioner.prompt_for(None)}', greedy, max {captioner.max_new_tokens} new tokens")


def _retrieval_captioner(cfg: RecipeConfig, out: Path, processor, tokenizer) -> RetrievalCaptioner:
    adapter = EmbeddingAdapter(_load(out / "stage1").eval(), processor.image_processor, tokenizer)
    return RetrievalCaptioner(adapter, phrase_vocabulary(), top_k=cfg.caption_phrases)


def _pairing_encoder(out: Path, processor, tokenizer) -> EmbeddingAdapter:
    """The image encoder that ranks the pool for rank-window pairing: the stage-0 model. The original ranks with an
    off-the-shelf image model (Unicom ViT-L/14), not with the CIR model being trained; stage 0 is the stand-in for
    such a pre-trained model here."""
    return EmbeddingAdapter(_load(out / "stage0").eval(), processor.image_processor, tokenizer)


def _caption_cache(cfg: RecipeConfig, captioner) -> Path:
    """Captions are cached (resumable) per config and per captioner, its weights included (`captioner_key`): a
    captioner trained again gets a new cache, not the old captions (nor the cache's error about them)."""
    return Path(cfg.output_dir) / f"captions_{cfg.captioner}_{_cache_name([_config_key(cfg), captioner_key(captioner)])}"


def run_default_recipe(cfg: RecipeConfig | None = None) -> dict:
    """The whole recipe. With `cfg.workers == 2`, in two lanes (processes, one thread each) at once:

        first lane:  stage 0 ------------------> [captions] rank-window triplets -> +P -> +P+N
        second lane: captioner -> pool captions + zero-shot triplets -> [stage 0] stage 1 -> +N -> +N (LoRA)
                     -> zero-shot -> caption precision

    On this project's 2-core machine a second thread per process speeds these tiny models up little, a second
    process much more (README: the embedded default). `workers=1`: one process, the second lane's steps run after
    stage 0, then the first lane's."""
    cfg = cfg or RecipeConfig()
    threads = torch.get_num_threads()
    try:
        if cfg.workers > 1:
            torch.set_num_threads(1)
        return _run_recipe(cfg)
    finally:
        torch.set_num_threads(threads)  # a caller (e.g. a test session) keeps its own setting


def _run_recipe(cfg: RecipeConfig) -> dict:
    import multiprocessing
    import threading

    start, cpu_start = time.perf_counter(), time.process_time()
    timings, lap = _lap_clock()
    datasets.disable_progress_bars() if not cfg.show_progress_bar else None
    for stamp in (STAGE0_STAMP, STAGES_STAMP):  # this run rewrites the stages: earlier stamps no longer hold
        (Path(cfg.output_dir) / stamp).unlink(missing_ok=True)
    prep = _prepare(cfg)
    out, corpus, processor, tokenizer = prep["out"], prep["corpus"], prep["processor"], prep["tokenizer"]
    annotated, train_corpus, pretrain = prep["annotated"], corpus["train"], corpus["pretrain"]
    lap("benchmark")
    if cfg.captioner == "oracle":
        _say("DIAGNOSTIC: captions come from the scene graph (oracle), not from a model")

    lane, lane_result = None, out / "second_lane.json"
    if cfg.workers > 1:
        ctx = multiprocessing.get_context("spawn")
        stage0_done, captions_done = ctx.Event(), ctx.Event()
        lane_result.unlink(missing_ok=True)
        lane = ctx.Process(target=_second_lane, args=(cfg, stage0_done, captions_done, str(lane_result)),
                           name="second-lane")
        lane.start()
        _say("second lane started beside this one (one thread each): captioner, stage 1, +N, zero-shot")
    else:
        stage0_done, captions_done = threading.Event(), threading.Event()
    results: dict = {}

    def evaluate(row: str, m) -> None:
        results[row] = prep["evaluator"](m)
        _say(f"{row}: test " + ", ".join(f"R@{k} {results[row][f'recall@{k}']:.2f}" for k in KS))

    try:
        model = build_model(tokenizer, cfg)
        _say(f"model: CLIP4CIR ViT {cfg.model_sizes}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
             f"parameters, vocabulary {len(tokenizer)} words")
        _say("stage 0: image-caption contrastive warm-up on the 'pretrain' images — a stand-in for CLIP's "
             "pre-training, not part of SPN")
        pixels = processor.image_processor([im for im in pretrain["image"]])["pixel_values"]
        losses = image_text_warmup(model, pixels, list(pretrain["caption"]), tokenizer, cfg.stage0_epochs,
                                   learning_rate=cfg.stage0_lr, temperature=cfg.temperature, seed=cfg.seed,
                                   show_progress_bar=cfg.show_progress_bar)
        model.save_pretrained(out / "stage0")
        processor.save_pretrained(out / "stage0")
        atomic_write_json(out / STAGE0_STAMP, {"config": _config_key(cfg)}, indent=1)
        stage0_done.set()
        _say(f"stage 0 done: {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        lap("stage 0")

        if lane is None:
            side = _second_lane(cfg, stage0_done, captions_done)
            lap("second lane (in this process)")
        else:
            _wait(captions_done, lane)
            lap("waiting for the pool's captions")
        pool = _unlabeled_pool(train_corpus, annotated)
        captioner, _ = _pool_captioner(cfg, pool, out, processor, tokenizer)
        generated, _, window = _generate(cfg, pool, captioner, _pairing_encoder(out, processor, tokenizer), tokenizer,
                                         out / "generated", _caption_cache(cfg, captioner))
        _say(f"positive scaling: {len(generated)} generated triplets from {len(pool)} unlabeled images (rank window "
             f"{window} of the stage-0 model's ranking)")
        lap("positive scaling")
        scaled = datasets.concatenate_datasets([annotated, generated.select_columns(TRIPLET_COLUMNS).cast(annotated.features)])
        evaluate("+P", _train(_load(out / "stage0"), processor, cfg, "in_batch", scaled, train_corpus, out / "stage1_P"))
        lap("+P")
        evaluate("+P+N", _train(_load(out / "stage1_P"), processor, cfg, "candidate_bank", scaled, train_corpus,
                                out / "stage2_PN"))
        lap("+P+N")
        if lane is not None:
            lane.join()
            if lane.exitcode != 0 or not lane_result.exists():
                raise RuntimeError(f"The recipe's second lane failed (exit code {lane.exitcode}); its traceback is "
                                   "printed above.")
            side = json.loads(lane_result.read_text())
            lap("waiting for the second lane")
    finally:
        if lane is not None and lane.is_alive():
            lane.terminate()
            lane.join()
    results = {row: {**results, **side["rows"]}[row] for row in ROWS}
    precision = side["precision"]

    # A picture of the best model's rankings (reference, text, top 8, the target marked): re-evaluated once with a
    # report, which reproduces the row's numbers.
    best = max(ROWS, key=lambda row: results[row]["recall@10"])
    report = CIREvaluator(corpus["test"], prep["triplets"]["test"], processor.image_processor, processor,
                          protocol="recall", batch_size=256, show_progress_bar=cfg.show_progress_bar,
                          report_dir=str(out / "retrieval_report"), report_queries=8)
    report(load_cir_model_and_processor(str(out / MODEL_DIRS[best]))[0])  # a LoRA row loads merged
    lap("retrieval report")
    table = format_table(results)
    elapsed = time.perf_counter() - start
    description = side["description"]
    summary = {
        "protocol": PROTOCOLS["recall"] + " (synthetic benchmark, test split)",
        "results": results,
        "caption_precision": precision,
        "captioner": description,
        "captioner_heldout": side["captioner_summary"],
        "generated_triplets": len(generated),
        "zero_shot_triplets": side["zero_shot_triplets"],
        "annotated_triplets": len(annotated),
        "seconds": round(elapsed, 1),
        # per lane (they run at once when workers > 1)
        "seconds_by_step": {"first lane": timings, "second lane": side["timings"]},
        # CPU time of this process's threads (the first lane only): on a shared machine wall time says little
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "threads_per_lane": torch.get_num_threads(),
        "retrieval_report": {"model": best, "html": str(out / "retrieval_report" / "retrieval_report.html")},
        "config": asdict(cfg),
    }
    atomic_write_json(out / "results.json", summary, indent=2)
    _plot(results, out / "recall_at_k.png")
    print("\nSPN ablation on the synthetic benchmark (test split; " + summary["protocol"] + ")\n")
    print(table)
    print("\nCaptions of the unlabeled pool (" + description + "):")
    for name, value in precision.items():
        print("  " + _precision_line(name, value))
    _say(f"done in {elapsed / 60:.1f} min; wrote {out / 'results.json'} and {out / 'recall_at_k.png'}")
    return summary


# ---------------------------------------------------------------------------------------------- several seeds
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
        done = _finished(Path(run_cfg.output_dir) / "results.json", run_cfg)
        if done:
            _say(f"seed {seed}: reusing {run_cfg.output_dir}/results.json")
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


# ---------------------------------------------------------------------------------------------- caption noise
def run_caption_noise_study(cfg: RecipeConfig, levels=NOISE_LEVELS) -> dict:
    """Diagnostic: +P and +P+N with scene-graph captions of the pool, a fraction `levels` of their phrases
    replaced by wrong ones, against the default run's stage 1 and +N. Reuses the default run in `output_dir`
    (runs it first if absent); writes OUTPUT_DIR/noise_study/results.json and caption_noise_study.png. With
    `cfg.workers > 1` the levels are shared among that many processes (one thread each); each finished level is
    kept (`point.json`), so an interrupted study resumes level by level."""
    import multiprocessing

    out = Path(cfg.output_dir)
    study = out / "noise_study"
    if _finished(out / "results.json", cfg):
        _say(f"caption noise study: reusing the default run in {out}")
    elif _finished(out / STAGE0_STAMP, cfg):  # a default run of this config got past stage 0 (or is still running)
        _say(f"caption noise study: reusing stage 0 of the default run in {out}")
    else:
        run_default_recipe(cfg)
    start = time.perf_counter()
    p = _prepare(cfg)
    pending = [level for level in levels if not _finished(study / _level_name(level) / "point.json", cfg)]
    lanes = min(cfg.workers, len(pending))
    if lanes > 1:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_noise_levels, args=(cfg, pending[i::lanes], True),
                             name=f"noise-lane-{i}") for i in range(lanes)]
        for proc in procs:
            proc.start()
        try:
            for proc in procs:
                proc.join()
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
        failed = [proc.name for proc in procs if proc.exitcode != 0]
        if failed:
            raise RuntimeError(f"Caption noise study: {failed} failed (tracebacks above); the finished levels are "
                               "kept, run again to resume.")
    elif pending:
        _noise_levels(cfg, pending)
    points = [_finished(study / _level_name(level) / "point.json", cfg)["point"] for level in levels]
    summary = _write_noise_study(cfg, points, p["evaluator"], time.perf_counter() - start)
    print("\nCaption noise study (test R@10; scene-graph captions with a share of phrases replaced by wrong ones)\n")
    print("| phrases corrupted | caption precision | +P R@10 | +P+N R@10 |\n|---|---|---|---|")
    for row in points:
        print(f"| {100 * row['corrupted']:.0f}% | {row['phrase_precision']:.1f}% | {row['+P']['recall@10']:.2f} | "
              f"{row['+P+N']['recall@10']:.2f} |")
    print("reference: " + ", ".join(f"{r} {v['recall@10']:.2f}" for r, v in summary["reference"].items()))
    _say(f"wrote {study / 'results.json'} and {out / 'caption_noise_study.png'}")
    return summary


def _level_name(level: float) -> str:
    return f"corrupt_{round(100 * level):02d}"


def _noise_levels(cfg: RecipeConfig, levels, own_process: bool = False) -> None:
    """Train and evaluate +P and +P+N at each corruption level of `levels`, paired like the default's +P; each
    level writes its `point.json`."""
    if own_process:
        cfg = _lane_process(cfg)
    out, study = Path(cfg.output_dir), Path(cfg.output_dir) / "noise_study"
    p = _prepare(cfg, quiet=True)
    corpus, processor, tokenizer, annotated = p["corpus"], p["processor"], p["tokenizer"], p["annotated"]
    train_corpus = corpus["train"]
    pool = _unlabeled_pool(train_corpus, annotated)
    adapter = _pairing_encoder(out, processor, tokenizer)
    scenes = dict(zip(pool["image_id"], pool["scene"]))
    for level in levels:
        name = _level_name(level)
        mapping = scene_captions(scenes, corrupt=level, seed=cfg.seed)
        generated, captions, _ = _generate(cfg, pool, ColumnCaptioner(mapping=mapping), adapter, tokenizer,
                                           study / name / "generated", study / name / f"captions_{_cache_name(mapping)}")
        precision = _pool_precision(pool, captions)
        scaled = datasets.concatenate_datasets(
            [annotated, generated.select_columns(TRIPLET_COLUMNS).cast(annotated.features)])
        plus_p = _train(_load(out / "stage0"), processor, cfg, "in_batch", scaled, train_corpus, study / name / "P")
        row = {"corrupted": level, **precision, "+P": p["evaluator"](plus_p)}
        row["+P+N"] = p["evaluator"](_train(_load(study / name / "P"), processor, cfg, "candidate_bank", scaled,
                                            train_corpus, study / name / "PN"))
        atomic_write_json(study / name / "point.json", {"config": _config_key(cfg), "point": row}, indent=1)
        _say(f"{name}: caption precision {row['phrase_precision']:.1f}%, +P R@10 {row['+P']['recall@10']:.2f}, "
             f"+P+N R@10 {row['+P+N']['recall@10']:.2f}")


def _write_noise_study(cfg: RecipeConfig, points: list[dict], evaluator, seconds: float) -> dict:
    """The study's results.json and plot."""
    out = Path(cfg.output_dir)
    default = _finished(out / "results.json", cfg)  # read now: a default run may have finished meanwhile
    if default:
        reference = {r: default["results"][r] for r in ("stage 1", "+N", "+P", "+P+N")}
        default_captioner = {"name": default["config"]["captioner"],
                             "precision": default["caption_precision"][default["config"]["captioner"]]}
    else:
        reference = {r: evaluator(_load(out / d)) for r, d in (("stage 1", "stage1"), ("+N", "stage2_N"))
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


# ---------------------------------------------------------------------------------------------- text-form probe
def run_text_form_probe(cfg: RecipeConfig) -> dict:
    """Diagnostic: every row's model on the test queries twice — with their annotated texts (the table) and with
    texts in the generated triplets' form, `"{target caption} instead of {reference caption}"` (template 0,
    captions from the scene graph). The annotated texts are edits of the reference ("make the yellow triangle
    pink"); the generated ones describe the whole target. A model that scores high on the second and low on the
    first has learnt to retrieve by a full description and to ignore the reference image. Needs a finished default
    run in `output_dir`; writes OUTPUT_DIR/text_form_probe.json."""
    from datasets_scripts.templates import TEMPLATES

    out = Path(cfg.output_dir)
    if not _finished(out / "results.json", cfg):
        raise FileNotFoundError(f"{out / 'results.json'} is not a finished default run of this config: run "
                                f"`python examples/run_cir.py --output_dir {out}` first.")
    p = _prepare(cfg)
    test = p["triplets"]["test"]
    captions = scene_captions(dict(zip(p["corpus"]["test"]["image_id"], p["corpus"]["test"]["scene"])))
    texts = [[TEMPLATES[0].format(captions[r], captions[t])] for r, t in zip(test["reference_id"], test["target_id"])]
    probe = test.remove_columns("modification_texts").add_column("modification_texts", texts)
    evaluator = CIREvaluator(p["corpus"]["test"], probe, p["processor"].image_processor, p["tokenizer"],
                             protocol="recall", batch_size=256, show_progress_bar=cfg.show_progress_bar)
    table = {}
    for row in ROWS:
        model = load_cir_model_and_processor(str(out / MODEL_DIRS[row]))[0]
        table[row] = {"annotated texts": p["evaluator"](model), "generated-form texts": evaluator(model)}
    summary = {"protocol": PROTOCOLS["recall"] + " (synthetic benchmark, test split)", "rows": table,
               "example": {"annotated": test[0]["modification_texts"][0], "generated form": texts[0][0]},
               "config": _config_key(cfg)}
    atomic_write_json(out / "text_form_probe.json", summary, indent=2)
    print("\nTest R@10 with the annotated texts and with generated-form texts (scene-graph captions)\n")
    print("| model | annotated texts | generated-form texts |\n|---|---|---|")
    for row, value in table.items():
        print(f"| {row} | {value['annotated texts']['recall@10']:.2f} | {value['generated-form texts']['recall@10']:.2f} |")
    return summary


def recipe_parser():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=RecipeConfig.output_dir)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="run the recipe once per seed (OUTPUT_DIR/seed_N) and report mean ± std per cell")
    parser.add_argument("--size", default="default", choices=["default", "tiny"])
    parser.add_argument("--captioner", default="generative", choices=list(CAPTIONERS),
                        help="who captions the unlabeled pool: the tiny LLaVA trained on 'pretrain' (default), the "
                             "stage-1 model by retrieval, or (diagnostic) the scene graph")
    parser.add_argument("--oracle_captions", action="store_true", help="the same as --captioner oracle")
    parser.add_argument("--caption_noise_study", action="store_true",
                        help="diagnostic: +P and +P+N with scene-graph captions corrupted at 0/25/50/75%% of phrases "
                             "(reuses the default run in OUTPUT_DIR, or runs it first)")
    parser.add_argument("--text_form_probe", action="store_true",
                        help="diagnostic: every row's model on the test queries with annotated texts and with texts "
                             "in the generated triplets' form (reuses the default run in OUTPUT_DIR)")
    parser.add_argument("--noise_levels", type=float, nargs="+", default=list(NOISE_LEVELS),
                        help="fractions of phrases to corrupt in --caption_noise_study")
    return parser


def main(argv=None) -> dict:
    args = recipe_parser().parse_args(argv)
    kw = dict(seed=args.seed, captioner="oracle" if args.oracle_captions else args.captioner)
    make = (lambda **k: RecipeConfig.tiny(args.output_dir, **k)) if args.size == "tiny" else (
        lambda **k: RecipeConfig(output_dir=args.output_dir, **k))
    if args.seeds:
        return run_seeds(make(**kw), args.seeds)
    if args.caption_noise_study:
        return run_caption_noise_study(make(**kw), args.noise_levels)
    if args.text_form_probe:
        return run_text_form_probe(make(**kw))
    return run_default_recipe(make(**kw))
