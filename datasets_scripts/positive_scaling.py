"""SPN's positive scaling, end to end: caption -> pair -> template -> a "scaled triplets" HF dataset.

The output has the project schema: `triplets` (split `train`, `source="generated"`, `modification_texts` =
one text per template, `reference_caption`, `target_caption`, `pair_rank`) and `corpus` (the images used,
with a `caption` column). `examples/run_cir.py --extra_triplets DIR_OR_ID` adds it to the annotated data.
"""

from __future__ import annotations

import logging
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path

import datasets

from modeling_spn4cir.storage import check_output_dir

from .captioning import caption_corpus
from .common import SplitData, counts_table, write_cir_dataset
from .image_store import ImageStore, encode_images
from .pairing import random_pairs, rank_window_pairs
from .templates import compose_modification_texts, resolve_templates

logger = logging.getLogger(__name__)
POOLS = ("triplet_images", "corpus")

TOOL = "datasets_scripts.positive_scaling"


def pairing_pool(corpus, triplets, pool: str = "triplet_images", dedup_map: dict[str, str] | None = None):
    """The images positive scaling captions and pairs.

    `pool="triplet_images"` (the original: `get_cir_data.py` pairs within `CIRDataset(..., 'train').imagenames`,
    the references and targets of the annotated train triplets, ~25k images on FashionIQ) keeps the rows of
    `corpus` whose image a triplet uses; `"corpus"` keeps the whole split (46.6k on FashionIQ, which moves the rank
    window 10k-20k from the 40-80 % band to 22-43 %). `dedup_map` (`{duplicate: canonical}`) drops duplicates, as
    the original's `optimized_images.json` does. Rows keep the corpus order.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}.")
    dedup_map = dedup_map or {}
    keep = None
    if pool == "triplet_images":
        keep = {i for column in ("reference_id", "target_id") for i in triplets[column] if i is not None}
    rows = [row for row, image_id in enumerate(corpus["image_id"])
            if (keep is None or image_id in keep) and image_id not in dedup_map]
    if not rows:
        raise ValueError(f"The {pool!r} pairing pool is empty: no corpus image is used by the triplets.")
    return corpus if len(rows) == len(corpus) else corpus.select(rows)


def generate_scaled_triplets(
    corpus,
    captioner,
    output_dir: str | Path,
    encoder=None,
    dataset: str | None = None,
    reference_ids: Sequence[str] | None = None,
    rank_window: tuple[int, int] | None = (10000, 20000),
    k: int = 1,
    templates: Sequence[int | str] | None = None,
    seed: int = 42,
    num_triplets: int | None = None,
    tokenizer=None,
    max_length: int | None = 77,
    caption_cache_dir: str | Path | None = None,
    batch_size: int = 32,
    shard_size: int = 1000,
    backend: str = "torch",
    show_progress_bar: bool = True,
    overwrite: bool = False,
    skip_empty_captions: bool = False,
) -> Path:
    """
    Args:
        corpus: the training images (HF dataset with `image_id`, `image`, optional `category`).
        output_dir: must be new, empty, or (with `overwrite`) a previous output of this function.
        captioner: a captioner (`datasets_scripts.captioners`).
        encoder: an object with `encode_pixels`, `image_processor` and `device` for rank-window pairing (the paper: Unicom ViT-L/14; any
            `EmbeddingAdapter`); unused when `rank_window` is None (random pairs).
        dataset: `fashioniq` / `cirr` / ... picks the default templates.
        reference_ids: restrict references to these images (`references_only`: the annotated references).
        rank_window: `(rank_min, rank_max)`; None pairs at random.
        k: targets per reference.
        num_triplets: keep a random subset of this many generated triplets (the original's `--K`: 3000 for BLIP4CIR,
            6000 for SPRC on FashionIQ; with k=1 that is K references); None keeps all.
        templates: indices into `TEMPLATES` and/or template strings.
        tokenizer, max_length: the fallback to `"{1}"` for texts longer than `max_length` tokens.
        caption_cache_dir: where caption shards are kept (resume after a crash); a temporary dir by default.
        skip_empty_captions: an empty caption would make a garbage modification text (`" instead of "`), so it is
            an error naming the images; True drops those images from pairing instead (counted in the log).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (targets per reference) must be a positive integer, got {k!r}: k=0 generates no "
                         "triplet.")
    check_output_dir(output_dir, TOOL, overwrite, [caption_cache_dir])  # before captioning, not after it
    images = ImageStore(corpus)
    image_ids = list(dict.fromkeys(corpus["image_id"]))
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    if reference_ids is not None:
        unknown = [r for r in dict.fromkeys(reference_ids) if r not in position]
        if unknown:
            raise ValueError(f"{len(unknown)} reference ids are not in the corpus (first: {unknown[:5]}).")
        references = [position[r] for r in dict.fromkeys(reference_ids)]
    else:
        references = None
    template_strings = resolve_templates(templates, dataset)

    with tempfile.TemporaryDirectory() as scratch:
        captions = caption_corpus(corpus, captioner, caption_cache_dir or scratch, shard_size, batch_size,
                                  show_progress_bar)
    empty = [i for i in image_ids if not isinstance(captions.get(i), str) or not captions[i].strip()]
    if empty and not skip_empty_captions:
        raise ValueError(
            f"The captioner returned an empty caption for {len(empty)} of {len(image_ids)} images (first: "
            f"{empty[:5]}); their modification texts would be garbage (' instead of '). Fix the captioner (prompt, "
            "max_new_tokens) and rerun (the cache keeps the other captions), or pass skip_empty_captions=True "
            "(--skip_empty_captions) to leave these images out of pairing."
        )
    if empty:
        logger.warning("Skipping %d images with empty captions (first: %s): they are left out of pairing.",
                       len(empty), empty[:5])
        dropped = set(empty)
        image_ids = [i for i in image_ids if i not in dropped]
        position = {image_id: i for i, image_id in enumerate(image_ids)}
        if references is not None:
            references = [position[r] for r in dict.fromkeys(reference_ids) if r in position]
    if rank_window is None:
        pairs = random_pairs(len(image_ids), references, k, seed)
    else:
        if encoder is None:
            raise ValueError("Rank-window pairing needs an image encoder (or pass rank_window=None for random pairs).")
        embeddings = encode_images(encoder.encode_pixels, images, image_ids, encoder.image_processor, batch_size,
                                   device=encoder.device, desc="images for pairing",
                                   show_progress_bar=show_progress_bar)
        pairs = rank_window_pairs(embeddings, references, rank_window[0], rank_window[1], k, seed,
                                  backend=backend, show_progress_bar=show_progress_bar)

    if not pairs:
        how = "random pairs" if rank_window is None else f"rank window {rank_window}"
        raise ValueError(f"No triplet was generated from {len(image_ids)} images ({how}, k={k}); use a larger "
                         "corpus, or a rank window inside it.")
    if num_triplets is not None:
        if not 0 < num_triplets <= len(pairs):
            raise ValueError(f"num_triplets={num_triplets} but {len(pairs)} triplets were generated; pass at most "
                             f"{len(pairs)} (or None for all).")
        chosen = sorted(random.Random(seed).sample(range(len(pairs)), num_triplets))
        pairs = [pairs[i] for i in chosen]

    category = dict(zip(corpus["image_id"], corpus["category"])) if "category" in corpus.column_names else {}
    triplets = []
    for pair in pairs:
        reference, target = image_ids[pair.reference], image_ids[pair.target]
        triplets.append({
            "reference_id": reference,
            "target_id": target,
            "modification_texts": compose_modification_texts(captions[reference], captions[target], template_strings,
                                                             tokenizer, max_length),
            "source": "generated",
            "reference_caption": captions[reference],
            "target_caption": captions[target],
            "pair_rank": pair.rank,
            "category": category.get(reference),
        })
    used = list(dict.fromkeys(i for t in triplets for i in (t["reference_id"], t["target_id"])))
    corpus_rows = []
    for image_id in used:
        data, name = images.raw(image_id)
        corpus_rows.append({"image_id": image_id, "image_bytes": data, "image_name": name and Path(name).name,
                            "caption": captions[image_id], "category": category.get(image_id)})
    split = {"train": SplitData(corpus=corpus_rows, triplets=triplets)}
    pairing = "random pairs" if rank_window is None else f"rank window [{rank_window[0]}, {rank_window[1]})"
    subset = "" if num_triplets is None else f", a random subset of {num_triplets} triplets"
    card = f"""# Scaled triplets (SPN positive scaling)

Generated with `spn4cir` (`datasets_scripts.positive_scaling`): captions by `{type(captioner).__name__}`,
{pairing}, k={k}, seed={seed}, templates {template_strings}{subset}. `source` = "generated".

{counts_table(split)}"""
    return write_cir_dataset(
        output_dir, split,
        corpus_extra={"caption": datasets.Value("string"), "category": datasets.Value("string")},
        triplet_extra={
            "reference_caption": datasets.Value("string"),
            "target_caption": datasets.Value("string"),
            "pair_rank": datasets.Value("int64"),
            "category": datasets.Value("string"),
        },
        card=card, tool=TOOL, overwrite=overwrite, protect=[caption_cache_dir],
    )
