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

  BLIP-family models / zero-shot: add --random_pairs (no encoder needed); BLIP4CIR on FashionIQ --K 3000,
  SPRC on FashionIQ --K 6000.

As the original (defaults): the pool is the images of the split's annotated triplets (--pool corpus: the whole
split), the MLLM's whole answer is the caption (--word_limit N cuts it to N words), max_new_tokens 1024, the user
turn is "user: " + prompt, and a composed text over 77 tokens falls back to "{1}" (counted with --tokenizer, by
default the --encoder's tokenizer, else OpenAI CLIP's, openai/clip-vit-base-patch32; --tokenizer none: no fallback).
  Without an MLLM: --captioner retrieval --encoder <CLIP or CIR model> --phrases phrases.txt (zero-shot
  captioning from a phrase vocabulary), or --captioner column --caption_column <column>.

Then train with the generated positives: examples/run_cir.py ... --extra_triplets fiq-scaled
The paper used Unicom ViT-L/14 for pairing; any CLIP (or CIR) image tower works here.
"""

import argparse
import json
from pathlib import Path

from datasets_scripts.captioners import (
    FASHIONIQ_PROMPT,
    IMAGE_PROMPT,
    ColumnCaptioner,
    EmbeddingAdapter,
    MLLMCaptioner,
    RetrievalCaptioner,
)
from datasets_scripts.load import load_cir_data
from datasets_scripts.positive_scaling import generate_scaled_triplets, pairing_pool

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
    p.add_argument("--captioner", required=True, help="an MLLM name or path, 'retrieval', or 'column'")
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
    p.add_argument("--K", type=int, default=None, help="keep a random subset of K generated triplets (BLIP 3000, "
                                                       "BLIP-2 6000 on FashionIQ)")
    p.add_argument("--k", type=int, default=1, help="targets per reference")
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
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    data = load_cir_data(args.dataset, args.data_dir)
    dedup_map = json.loads(Path(args.dedup_map).read_text()) if args.dedup_map else None
    corpus = pairing_pool(data.corpus[args.split], data.triplets[args.split], args.pool, dedup_map)
    encoder = None
    if args.encoder:
        from modeling_spn4cir.loading import load_cir_model_and_processor

        model, processor = load_cir_model_and_processor(args.encoder)
        encoder = EmbeddingAdapter(model.to(args.device).eval(), processor.image_processor, processor.tokenizer)
    if args.captioner == "retrieval":
        if encoder is None or not args.phrases:
            raise SystemExit("--captioner retrieval needs --encoder and --phrases.")
        phrases = [line.strip() for line in Path(args.phrases).read_text().splitlines() if line.strip()]
        captioner = RetrievalCaptioner(encoder, phrases, top_k=args.top_k_phrases)
    elif args.captioner == "column":
        captioner = ColumnCaptioner(column=args.caption_column)
    else:
        default_words = 5 if args.dataset == "fashioniq" else 10
        prompt = args.prompt or (FASHIONIQ_PROMPT if args.dataset == "fashioniq" else IMAGE_PROMPT)
        captioner = MLLMCaptioner(args.captioner, prompt=prompt, num_words=args.num_words or default_words,
                                  max_new_tokens=args.max_new_tokens, word_limit=args.word_limit, device=args.device)
    tokenizer = None
    if args.tokenizer and args.tokenizer.lower() == "none":
        pass
    elif args.tokenizer or encoder is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or CLIP_TOKENIZER)
    else:
        tokenizer = encoder.tokenizer
    references = list(data.triplets[args.split]["reference_id"]) if args.references_only else None
    out = generate_scaled_triplets(
        corpus, captioner, args.output_dir, encoder=encoder, dataset=data.name, reference_ids=references,
        rank_window=None if args.random_pairs else (args.rank_min, args.rank_max), k=args.k,
        templates=args.templates, seed=args.seed, num_triplets=args.K, tokenizer=tokenizer, max_length=args.max_length,
        caption_cache_dir=args.caption_cache_dir, batch_size=args.batch_size, backend=args.backend,
        overwrite=args.overwrite_output_dir, skip_empty_captions=args.skip_empty_captions,
    )
    print(f"wrote {out.path}")


if __name__ == "__main__":
    main()
