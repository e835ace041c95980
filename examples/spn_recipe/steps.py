"""The recipe's steps, each a method of `RecipeRun` (their order: `recipe.recipe_steps`; their lanes: `recipe_lanes`).

A step's models are written to OUTPUT_DIR/<its directory>, where the next step loads them; its value (a row's
metrics, the pool's captions, the generated triplets) is JSON, so that the other lane can receive it.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from datasets_scripts.common import TRIPLET_FEATURES
from datasets_scripts.load import load_training_triplets
from datasets_scripts.positive_scaling import ScaledTriplets, caption_images, scale_positives
from datasets_scripts.synthetic import build_synthetic, phrase_vocabulary
from modeling_spn4cir import CLIP4CIRImageProcessor, CLIP4CIRProcessor
from modeling_spn4cir.storage import apply_umask
from trainers.evaluation import CIREvaluator

from .captions import (
    caption_cache,
    pairing_encoder,
    pool_captioner,
    pool_precision,
    retrieval_captioner,
    retrieval_captions,
)
from .collection import pool_as_collection
from .config import RecipeConfig, say
from .generative_captioner import CaptionerConfig, train_generative_captioner
from .report import precision_line, recall_line
from .stamps import STAGE0, benchmark_is_current, stamp, stamp_benchmark
from .tokenizer import train_word_tokenizer
from .training import build_model, load_model, train_cir, warm_up

TRIPLET_COLUMNS = list(TRIPLET_FEATURES)  # the schema's core columns, shared by every source


def benchmark(cfg: RecipeConfig, quiet: bool = False) -> Path:
    """Step 1: the synthetic benchmark in OUTPUT_DIR/benchmark, built once per seed and size."""
    path = Path(cfg.output_dir) / "benchmark"
    if benchmark_is_current(path, cfg):
        if not quiet:
            say(f"reusing the benchmark in {path}")
    else:
        build_synthetic(path, cfg.seed, cfg.size, overwrite=True)  # the recipe's own earlier benchmark only
        stamp_benchmark(path, cfg)
        say(f"built the benchmark in {path}")
    return path


class RecipeRun:
    """One run of the recipe in `cfg.output_dir`: the benchmark (step 1), the word-level tokenizer, processor and
    test evaluator (step 2), the annotated triplets and the unlabeled pool; the steps are its methods."""

    def __init__(self, cfg: RecipeConfig, quiet: bool = False):
        self.cfg, self.out = cfg, Path(cfg.output_dir)
        bench = benchmark(cfg, quiet)
        self.triplets = datasets.load_dataset(str(bench), "triplets")
        self.corpus = datasets.load_dataset(str(bench), "corpus")
        texts = (list(self.corpus["pretrain"]["caption"])
                 + [t for ts in self.triplets["train"]["modification_texts"] for t in ts]
                 + phrase_vocabulary() + ["instead of", "unlike , i want"])
        self.tokenizer = train_word_tokenizer(texts, model_max_length=48)
        self.processor = CLIP4CIRProcessor(image_processor=CLIP4CIRImageProcessor(preprocessing="resize", size=64),
                                           tokenizer=self.tokenizer)
        self.evaluator = CIREvaluator(self.corpus["test"], self.triplets["test"], self.processor.image_processor,
                                      self.tokenizer, protocol="recall", batch_size=256,
                                      show_progress_bar=cfg.show_progress_bar)
        self.annotated = self.triplets["train"].select_columns(TRIPLET_COLUMNS)
        self.train_corpus = self.corpus["train"]
        used = set(self.annotated["reference_id"]) | set(self.annotated["target_id"])
        self.pool = self.train_corpus.select([i for i, image_id in enumerate(self.train_corpus["image_id"])
                                              if image_id not in used])

    # ------------------------------------------------------------------------------------------- helpers
    def evaluate(self, row: str, metrics: dict) -> dict:
        """`row`'s test metrics (the ablation table's cells), printed."""
        say(recall_line(row, metrics))
        return metrics

    def train(self, start: str, stage: str, train, out: str, corpus=None, **kw):
        """`train_cir` from the model in OUTPUT_DIR/`start` into OUTPUT_DIR/`out`, the images from `corpus` (default:
        the benchmark's train corpus); -> the trained model."""
        return self._train(start, stage, train, out, None, corpus, **kw)[0]

    def scored(self, start: str, stage: str, train, out: str, corpus=None, **kw) -> dict:
        """`train`, then the model's test metrics, evaluated by its trainer (so its model card records them)."""
        return self._train(start, stage, train, out, self.evaluator, corpus, **kw)[1]

    def _train(self, start: str, stage: str, train, out: str, evaluator, corpus, **kw):
        card = {"base": f"the recipe's `{start}` model (a small CLIP4CIR built from a config)",
                "training_data": f"{len(train)} triplets of the synthetic CIR benchmark (seed {self.cfg.seed}, size "
                                 f"{self.cfg.size})",
                "eval_dataset": ("spn4cir-synthetic", "the synthetic CIR benchmark"), "eval_split": "test"}
        return train_cir(load_model(self.out / start), self.processor, self.cfg, stage, train,
                         self.train_corpus if corpus is None else corpus, self.out / out, evaluator=evaluator,
                         card=card, **kw)

    def as_dataset(self, triplets: list[dict]) -> datasets.Dataset:
        """Generated triplets (rows of the scaled-triplets schema) with the annotated triplets' columns and types."""
        return datasets.Dataset.from_list([{c: t[c] for c in TRIPLET_COLUMNS} for t in triplets],
                                          features=self.annotated.features)

    def with_annotated(self, triplets: list[dict]) -> datasets.Dataset:
        return datasets.concatenate_datasets([self.annotated, self.as_dataset(triplets)])

    def rank_window(self) -> tuple[int, int]:
        """`cfg.rank_window` (fractions of the pool) in images."""
        n = len(self.pool)
        return max(1, int(self.cfg.rank_window[0] * n)), int(self.cfg.rank_window[1] * n)

    def scaled(self, captions: dict, out: str, rank_window, encoder=None) -> ScaledTriplets:
        """Positive scaling of the captioned pool (`captions`: from `captioned`, e.g. the "pool captions" step):
        pairs in `rank_window` (images) or at random (None), CIRR's templates, into OUTPUT_DIR/`out`."""
        return scale_positives(
            self.pool, captions["captions"], self.out / out, encoder=encoder, dataset="cirr", rank_window=rank_window,
            k=self.cfg.k, seed=self.cfg.seed, tokenizer=self.tokenizer, max_length=self.tokenizer.model_max_length,
            batch_size=256, show_progress_bar=self.cfg.show_progress_bar, overwrite=True, protect=[captions["cache"]],
            captioned_by=captions["captioned_by"])

    def captioned(self, captioner, cache: Path, description: str = "") -> dict:
        """The pool's captions by `captioner` (cached in `cache`: an interrupted run resumes), as `scaled` takes
        them."""
        captions = caption_images(self.pool, captioner, cache, batch_size=256,
                                  show_progress_bar=self.cfg.show_progress_bar)
        return {"captions": captions, "description": description, "captioned_by": type(captioner).__name__,
                "cache": str(cache)}

    # ------------------------------------------------------------------------------------------- steps
    def stage0(self) -> None:
        """Steps 2 and 3: the small CLIP4CIR built from a config, and its warm-up (OUTPUT_DIR/stage0)."""
        model = build_model(self.tokenizer, self.cfg)
        say(f"model: CLIP4CIR ViT {self.cfg.model_sizes}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
            f"parameters, vocabulary {len(self.tokenizer)} words")
        losses = warm_up(model, self.processor, self.corpus["pretrain"], self.cfg)
        model.save_pretrained(self.out / "stage0")
        self.processor.save_pretrained(self.out / "stage0")
        apply_umask(self.out / "stage0")
        stamp(self.out / STAGE0, self.cfg)
        say(f"stage 0 done: {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    def stage1(self) -> dict:
        """Step 4: in-batch CIR fine-tuning on the annotated triplets."""
        return self.evaluate("stage 1", self.scored("stage0", "in_batch", self.annotated, "stage1"))

    def train_captioner(self) -> dict | None:
        """Step 5: the generative captioner (a tiny LLaVA trained only on `pretrain`); nothing for the others."""
        if self.cfg.captioner != "generative":
            return None
        say("captioner: a tiny LLaVA trained only on the 'pretrain' captions (a stand-in for the paper's LLaVA), "
            "used through MLLMCaptioner (processor, chat template, generate)")
        config = CaptionerConfig(**self.cfg.captioner_config)
        summary = train_generative_captioner(self.corpus["pretrain"], self.out / "captioner", config, self.cfg.seed,
                                             show_progress_bar=self.cfg.show_progress_bar)
        say(precision_line(f"captioner on {config.heldout} held-out 'pretrain' images", summary["heldout"]))
        return summary


    def caption_pool(self) -> dict:
        """Step 6a: the captioner captions the unlabeled pool."""
        captioner, description = pool_captioner(self.cfg, self.pool, self.out, self.processor, self.tokenizer)
        return self.captioned(captioner, caption_cache(self.cfg, captioner), description)

    def positive_scaling(self, captions: dict) -> list[dict]:
        """Step 6b: pairs in the rank window of the stage-0 model's ranking, the templates filled."""
        window = self.rank_window()
        scaled = self.scaled(captions, "generated", window, pairing_encoder(self.out, self.processor, self.tokenizer))
        say(f"positive scaling: {len(scaled.triplets)} generated triplets from {len(self.pool)} unlabeled images "
            f"(rank window {window} of the stage-0 model's ranking)")
        return scaled.triplets

    def zero_shot_triplets(self, captions: dict) -> dict:
        """Step 6c: the zero-shot data as real zero-shot data is made (docs/zero_shot.md): the pool written as an
        image collection (webdataset shards) and converted with `datasets_scripts.images`; that corpus captioned by
        the same captioner (the pool's caption cache holds its images: same ids, same bytes) and paired at random, as
        the original's in-domain ZS-CIR (zscir, `--model zs`). Returns the triplets and the dataset's path."""
        corpus = pool_as_collection(self.pool, self.out)
        captioner, _ = pool_captioner(self.cfg, self.pool, self.out, self.processor, self.tokenizer)
        converted = caption_images(corpus, captioner, captions["cache"], batch_size=256,
                                   show_progress_bar=self.cfg.show_progress_bar)
        scaled = scale_positives(
            corpus, converted, self.out / "generated_zero_shot", dataset="cirr", rank_window=None, k=self.cfg.k,
            seed=self.cfg.seed, tokenizer=self.tokenizer, max_length=self.tokenizer.model_max_length, batch_size=256,
            show_progress_bar=self.cfg.show_progress_bar, overwrite=True, protect=[captions["cache"]],
            captioned_by=captions["captioned_by"])
        return {"triplets": scaled.triplets, "path": str(scaled.path), "collection": str(self.out / "pool_shards")}

    def plus_n(self) -> dict:
        """Step 7: stage 2 on the annotated triplets (+N); its candidate bank is shared with +N (LoRA): the same
        frozen stage-1 towers over the same images."""
        return self.evaluate("+N", self.scored("stage1", "candidate_bank", self.annotated, "stage2_N",
                                               bank_dir=self.out / "bank_stage1"))

    def plus_n_lora(self) -> dict:
        return self.evaluate("+N (LoRA)", self.scored("stage1", "candidate_bank", self.annotated, "stage2_N_lora",
                                                      lora_r=self.cfg.lora_r, bank_dir=self.out / "bank_stage1"))

    def plus_p(self, triplets: list[dict]) -> dict:
        """Step 8: stage 1 with the generated positives (+P) ..."""
        return self.evaluate("+P", self.scored("stage0", "in_batch", self.with_annotated(triplets), "stage1_P"))

    def plus_p_n(self, triplets: list[dict]) -> dict:
        """... then stage 2 (+P+N) ..."""
        return self.evaluate("+P+N", self.scored("stage1_P", "candidate_bank", self.with_annotated(triplets),
                                                "stage2_PN"))

    def zero_shot(self, data: dict) -> dict:
        """... and zero-shot (SPN's low-resource setting): no annotated triplet at all, stage 1 then stage 2 on the
        generated ones, read as `run_cir.py --train_dataset` reads them (their images from their own corpus)."""
        train = load_training_triplets([data["path"]], columns=TRIPLET_COLUMNS)
        self.train("stage0", "in_batch", train.triplets, "zero_shot_stage1", corpus=train.corpora)
        return self.evaluate("zero-shot", self.scored("zero_shot_stage1", "candidate_bank", train.triplets,
                                                     "zero_shot", corpus=train.corpora))

    def caption_precision(self, captions: dict) -> dict:
        """The pool's captions scored against the scene graph, and the stage-1 model's retrieval captions next to
        them (scored only)."""
        precision = {self.cfg.captioner: pool_precision(self.pool, captions["captions"])}
        if self.cfg.captioner != "retrieval":
            captioner = retrieval_captioner(self.cfg, self.out, self.processor, self.tokenizer)
            precision["retrieval"] = pool_precision(self.pool, retrieval_captions(captioner, self.pool))
        for name, value in precision.items():
            say(precision_line(f"{name} captions of the pool", value))
        return precision
