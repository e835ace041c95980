"""The recipe's command line (`python examples/run_cir.py` with no `--dataset`): the default, or a diagnostic."""

from __future__ import annotations

import argparse

from . import recipe
from .config import CAPTIONERS, NOISE_LEVELS, RecipeConfig
from .edit_study import run_edit_writer_study
from .negative_study import run_negative_study
from .noise_study import run_caption_noise_study
from .seeds import run_seeds
from .text_form_probe import run_text_form_probe


def recipe_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=recipe.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--negative_study", action="store_true",
                        help="diagnostic: stage 1 with each negative type (alone, and target + each other), stage 2 "
                             "with in-batch / 128 / 1000 sampled / whole-bank / bank + unlabeled-pool negatives "
                             "(reuses the default run in OUTPUT_DIR, or trains stage 0 first)")
    parser.add_argument("--edit_writer_study", action="store_true",
                        help="diagnostic: +P and zero-shot with modification texts written from both images by a "
                             "two-image stand-in editor trained on 'pretrain' pairs, against the templates (reuses "
                             "the default run in OUTPUT_DIR)")
    parser.add_argument("--study_seeds", type=int, nargs="+", default=None,
                        help="training seeds of each --negative_study point (default: SEED, SEED+1, SEED+2)")
    return parser


def main(argv=None) -> dict:
    args = recipe_parser().parse_args(argv)
    kw = dict(seed=args.seed, captioner="oracle" if args.oracle_captions else args.captioner)
    cfg = (RecipeConfig.tiny(args.output_dir, **kw) if args.size == "tiny"
           else RecipeConfig(output_dir=args.output_dir, **kw))
    if args.seeds:
        return run_seeds(cfg, args.seeds)
    if args.caption_noise_study:
        return run_caption_noise_study(cfg, args.noise_levels)
    if args.text_form_probe:
        return run_text_form_probe(cfg)
    if args.negative_study:
        return run_negative_study(cfg, args.study_seeds)
    if args.edit_writer_study:
        return run_edit_writer_study(cfg)
    return recipe.run_default_recipe(cfg)
