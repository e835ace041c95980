"""Generate SPN's scaled triplets (positive scaling): caption every training image with a multimodal LLM, pair
images whose similarity rank falls in a middle window, and turn the two captions into modification texts.

Full recipes (the paper's settings; the caption cache makes a crashed run resumable, and under
`accelerate launch` / `torchrun` the captioning is split across processes):

  FashionIQ (CLIP4CIR / TG-CIR: references only, ranks 10000-20000 of the ~25k train-triplet images, template
  "{1}", prompt "... in 5 words"):
    accelerate launch examples/generate_triplets.py --dataset fashioniq --data_dir fashionIQ_dataset \\
        --captioner llava-hf/llava-1.5-7b-hf --num_words 5 \\
        --encoder openai/clip-vit-large-patch14 --rank_min 10000 --rank_max 20000 --references_only \\
        --templates 2 --output_dir fiq-scaled --caption_cache_dir fiq-captions

  CIRR (every train-triplet image a reference, ranks 10000-15000, templates 0 and 1, prompt "... in 10 words"):
    accelerate launch examples/generate_triplets.py --dataset cirr --data_dir CIRR \\
        --captioner llava-hf/llava-1.5-7b-hf --num_words 10 \\
        --encoder openai/clip-vit-large-patch14 --rank_min 10000 --rank_max 15000 \\
        --templates 0 1 --output_dir cirr-scaled --caption_cache_dir cirr-captions

  BLIP-family models / zero-shot: add --random_pairs (no encoder needed); BLIP4CIR on FashionIQ
  --num_triplets 3000, SPRC on FashionIQ --num_triplets 6000 (the original's --K; its --k is
  --targets_per_reference here).

As the original (defaults): the pool is the images of the split's annotated triplets (--pool corpus: the whole
split), the MLLM's whole answer is the caption (--word_limit N cuts it to N words), max_new_tokens 1024, the user
turn is "user: " + prompt, and a composed text over 77 tokens falls back to "{1}" (counted with --tokenizer, by
default the --encoder's tokenizer, else OpenAI CLIP's, openai/clip-vit-base-patch32; --tokenizer none: no fallback).
  Without an MLLM: --captioner retrieval --encoder <CLIP or CIR model> --phrases phrases.txt (zero-shot
  captioning from a phrase vocabulary), or --captioner column --caption_column <column>.

An image collection without annotations (a folder, webdataset shards such as CC3M's, a Hub image dataset; zero-shot
CIR): convert it with `python -m datasets_scripts.images --images ... --output_dir cc-corpus [--limit 50000]`, then
    python examples/generate_triplets.py --dataset cc-corpus --pool corpus --random_pairs --captioner ... \\
        --output_dir cc-scaled

The paper's zero-shot settings are ready configs (the first argument; flags after it override):
    accelerate launch examples/generate_triplets.py examples/configs/triplets/zeroshot_cc_fiq.json \\
        --dataset cc-corpus --output_dir cc-fiq-triplets
(zeroshot_cc_fiq / zeroshot_cc_cirr: CC3M out of domain; zeroshot_fiq / zeroshot_cirr: the benchmark's own images).

Modification texts written by an MLLM that sees both images (instead of the templates, the paper's setting):
--texts mllm_pairs --editor llava-hf/llava-onevision-qwen2-7b-ov-hf [--edit_prompt ...] [--edit_cache_dir DIR]
(--captioner is then optional: with it, the captions are recorded with the triplets).

Then train with the generated positives: examples/run_cir.py ... --extra_triplets fiq-scaled
The paper used Unicom ViT-L/14 for pairing; any CLIP (or CIR) image tower works here.
"""

import argparse
import json
import sys
from pathlib import Path

from datasets_scripts.captioners import (
    FASHIONIQ_PROMPT,
    IMAGE_PROMPT,
    ColumnCaptioner,
    EmbeddingAdapter,
    MLLMCaptioner,
    RetrievalCaptioner,
)
from datasets_scripts.edit_writer import EDIT_MAX_NEW_TOKENS, EDIT_PROMPT, MLLMEditWriter
from datasets_scripts.load import load_cir_data
from datasets_scripts.positive_scaling import TOOL as SCALING_TOOL
from datasets_scripts.positive_scaling import (
    caption_images,
    generate_edited_triplets,
    generate_scaled_triplets,
    pairing_pool,
)
from modeling_spn4cir.cli import add_debug_flag, renamed_option, run_cli
from modeling_spn4cir.storage import check_output_dir

# The original counts tokens with `clip.tokenize` (OpenAI CLIP's BPE, 77 with start and end tokens).
CLIP_TOKENIZER = "openai/clip-vit-base-patch32"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="fashioniq, cirr, or a dataset dir/Hub id in the spn4cir schema")
    p.add_argument("--data_dir", help="official layout (or converted dir) for fashioniq / cirr")
    p.add_argument("--split", default="train")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="replace --output_dir when it holds a previous output of this script (never other files)")
    p.add_argument("--captioner", help="an MLLM name or path, 'retrieval', or 'column' (required with --texts "
                                       "templates)")
    p.add_argument("--num_words", type=int, default=None, help="n in the prompt '... in n words' (FashionIQ 5, CIRR 10)")
    p.add_argument("--word_limit", type=int, default=None,
                   help="cut MLLM captions to this many words (default: the whole answer, as the original)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="MLLM budget (default 1024, the original's)")
    p.add_argument("--prompt", help="default: the paper's prompt for the dataset")
    p.add_argument("--phrases", help="retrieval captioner: a text file, one phrase per line")
    p.add_argument("--top_k_phrases", type=int, default=2)
    p.add_argument("--caption_column", help="column captioner: the corpus column holding captions")
    p.add_argument("--encoder", help="image encoder for pairing / retrieval captions (CLIP or CIR checkpoint)")
    p.add_argument("--rank_min", type=int, default=10000)
    p.add_argument("--rank_max", type=int, default=20000)
    p.add_argument("--random_pairs", action="store_true", help="pair at random (BLIP-family / zero-shot)")
    p.add_argument("--references_only", action="store_true", help="only annotated references are references")
    p.add_argument("--pool", default="triplet_images", choices=["triplet_images", "corpus"],
                   help="images to caption and pair: those of the split's annotated triplets (the original) or the "
                        "whole split's corpus")
    p.add_argument("--dedup_map", help="JSON {duplicate id: canonical id}: duplicates leave the pool")
    p.add_argument("--targets_per_reference", type=int, default=1, help="targets paired with each reference (the "
                                                                       "original's --k)")
    p.add_argument("--num_triplets", type=int, default=None,
                   help="keep a random subset of this many generated triplets (the original's --K: BLIP4CIR 3000, "
                        "SPRC 6000 on FashionIQ); default: all")
    # The original's one-letter names differ only in case; a swapped one would silently ask for 3000 targets each.
    renamed_option(p, "--k", "--targets_per_reference (targets paired with each reference)")
    renamed_option(p, "--K", "--num_triplets (keep a random subset of this many generated triplets)")
    p.add_argument("--texts", default="templates", choices=["templates", "mllm_pairs"],
                   help="modification texts from the two captions with templates (the paper's), or written by an "
                        "MLLM (--editor) that sees both images")
    p.add_argument("--editor", help="--texts mllm_pairs: a multimodal chat model (name or path) taking two images")
    p.add_argument("--edit_prompt", default=EDIT_PROMPT, help="--texts mllm_pairs: the prompt after the two images")
    p.add_argument("--edit_max_new_tokens", type=int, default=EDIT_MAX_NEW_TOKENS)
    p.add_argument("--edit_cache_dir", help="--texts mllm_pairs: text shards (resume); default: a temporary directory")
    p.add_argument("--templates", nargs="+", help="template indices (0, 1, 2) or strings with {0} and {1}")
    p.add_argument("--tokenizer", help="tokenizer for the too-long fallback to '{1}' (default: the --encoder's, "
                                      "else openai/clip-vit-base-patch32; 'none' turns the fallback off)")
    p.add_argument("--max_length", type=int, default=77)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--caption_cache_dir", help="caption shards (resume); default: a temporary directory")
    p.add_argument("--skip_empty_captions", action="store_true",
                   help="leave images with an empty caption out of pairing (counted) instead of stopping")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--backend", default="torch", choices=["torch", "faiss"])
    p.add_argument("--device", default="cpu")
    return add_debug_flag(p)


def _captioner(args, encoder):
    if args.captioner == "retrieval":
        if encoder is None or not args.phrases:
            raise SystemExit("--captioner retrieval needs --encoder and --phrases.")
        phrases = [line.strip() for line in Path(args.phrases).read_text().splitlines() if line.strip()]
        return RetrievalCaptioner(encoder, phrases, top_k=args.top_k_phrases)
    if args.captioner == "column":
        return ColumnCaptioner(column=args.caption_column)
    default_words = 5 if args.dataset == "fashioniq" else 10
    prompt = args.prompt or (FASHIONIQ_PROMPT if args.dataset == "fashioniq" else IMAGE_PROMPT)
    return MLLMCaptioner(args.captioner, prompt=prompt, num_words=args.num_words or default_words,
                         max_new_tokens=args.max_new_tokens, word_limit=args.word_limit, device=args.device)


def _tokenizer(args, encoder):
    """The tokenizer of the too-long fallback to '{1}' (None: no fallback)."""
    if args.tokenizer and args.tokenizer.lower() == "none":
        return None
    if args.tokenizer or encoder is None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(args.tokenizer or CLIP_TOKENIZER)
    return encoder.tokenizer


def _check_request(args, triplets) -> None:
    """Options that cannot work together, before any model is loaded."""
    if args.texts == "templates" and not args.captioner:
        raise SystemExit("--texts templates needs --captioner (an MLLM, 'retrieval' or 'column').")
    if args.texts == "mllm_pairs" and not args.editor:
        raise SystemExit("--texts mllm_pairs needs --editor (a multimodal chat model taking two images).")
    if triplets is None and (args.pool == "triplet_images" or args.references_only):
        raise SystemExit(f"{args.dataset} has no annotated triplets in split {args.split!r} (an image collection): "
                         "pass --pool corpus, without --references_only.")


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments; a JSON config as the first argument gives the defaults (the paper's settings in
    examples/configs/triplets/), the flags after it override them."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith(".json"):
        config = json.loads(Path(argv[0]).read_text())
        actions = {action.dest: action for action in parser._actions}
        unknown = sorted(set(config) - set(actions))
        if unknown:
            raise ValueError(f"{argv[0]}: unknown keys {unknown}; `python examples/generate_triplets.py --help` lists "
                             "the arguments.")
        for key in config:
            actions[key].required = False  # given by the config
        parser.set_defaults(**config)
        argv = argv[1:]
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    data = load_cir_data(args.dataset, args.data_dir)
    triplets = data.triplets.get(args.split)
    _check_request(args, triplets)
    dedup_map = json.loads(Path(args.dedup_map).read_text()) if args.dedup_map else None
    corpus = pairing_pool(data.corpus[args.split], triplets, args.pool, dedup_map)
    encoder = None
    if args.encoder:
        from modeling_spn4cir.loading import load_cir_model_and_processor

        model, processor = load_cir_model_and_processor(args.encoder)
        encoder = EmbeddingAdapter(model.to(args.device).eval(), processor.image_processor, processor.tokenizer)
    references = list(triplets["reference_id"]) if args.references_only else None
    rank_window = None if args.random_pairs else (args.rank_min, args.rank_max)
    if args.texts == "mllm_pairs":
        out = _edited(args, corpus, encoder, references, rank_window)
    else:
        out = generate_scaled_triplets(
            corpus, _captioner(args, encoder), args.output_dir, encoder=encoder, dataset=data.name,
            reference_ids=references, rank_window=rank_window, k=args.targets_per_reference, templates=args.templates,
            seed=args.seed, num_triplets=args.num_triplets, tokenizer=_tokenizer(args, encoder),
            max_length=args.max_length,
            caption_cache_dir=args.caption_cache_dir, batch_size=args.batch_size, backend=args.backend,
            overwrite=args.overwrite_output_dir, skip_empty_captions=args.skip_empty_captions,
        )
    print(f"wrote {out.path}")


def _edited(args, corpus, encoder, references, rank_window):
    """--texts mllm_pairs: (captions, if --captioner,) pairs, texts by the --editor from both images."""
    check_output_dir(args.output_dir, SCALING_TOOL, args.overwrite_output_dir,
                     [args.caption_cache_dir, args.edit_cache_dir])  # before captioning, not after it
    captions = None
    if args.captioner:
        captions = caption_images(corpus, _captioner(args, encoder), args.caption_cache_dir, batch_size=args.batch_size,
                                  skip_empty_captions=args.skip_empty_captions)
    editor = MLLMEditWriter(args.editor, prompt=args.edit_prompt, max_new_tokens=args.edit_max_new_tokens,
                            device=args.device)
    return generate_edited_triplets(
        corpus, editor, args.output_dir, encoder=encoder, reference_ids=references, rank_window=rank_window,
        k=args.targets_per_reference, seed=args.seed, num_triplets=args.num_triplets, captions=captions,
        edit_cache_dir=args.edit_cache_dir,
        batch_size=args.batch_size, backend=args.backend, overwrite=args.overwrite_output_dir,
        protect=[args.caption_cache_dir],
    )


if __name__ == "__main__":
    run_cli(main)
