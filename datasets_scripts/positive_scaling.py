"""SPN's positive scaling, end to end: caption -> pair -> compose -> write, a "scaled triplets" HF dataset.

`generate_scaled_triplets` runs the four steps (`caption_images`, `pair_images`, `compose_triplets`,
`write_scaled_triplets`); `scale_positives` runs the last three on captions already made (e.g. one pool captioned
once, paired twice). `generate_edited_triplets` pairs and writes each pair's text with an edit writer that sees both
images (`datasets_scripts.edit_writer`) instead of templates. All return the triplets and the captions they wrote
(`ScaledTriplets`).

The output has the project schema: `triplets` (split `train`, `source="generated"`, `modification_texts` =
one text per template, `reference_caption`, `target_caption`, `pair_rank`) and `corpus` (the images used,
with a `caption` column). `examples/run_cir.py --extra_triplets DIR_OR_ID` adds it to the annotated data.
"""

from __future__ import annotations

import logging
import random
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets

from modeling_spn4cir.image_store import ImageStore, encode_images
from modeling_spn4cir.storage import check_output_dir

from .captioning import caption_corpus
from .common import SplitData, counts_table, write_cir_dataset
from .edit_writer import write_edits
from .pairing import Pair, random_pairs, rank_window_pairs
from .templates import compose_modification_texts, resolve_templates

logger = logging.getLogger(__name__)
POOLS = ("triplet_images", "corpus")

TOOL = "datasets_scripts.positive_scaling"
SCALED_TRIPLET_EXTRA = {
    "reference_caption": datasets.Value("string"),
    "target_caption": datasets.Value("string"),
    "pair_rank": datasets.Value("int64"),
    "category": datasets.Value("string"),
}
SCALED_CORPUS_EXTRA = {"caption": datasets.Value("string"), "category": datasets.Value("string")}


@dataclass
class ScaledTriplets:
    """What positive scaling wrote to `path`: `triplets` (rows of the scaled-triplets schema, in pair order) and
    `captions` (`{image_id: caption}` of the images they use, in the order of the written corpus)."""

    triplets: list[dict]
    captions: dict[str, str]
    path: Path


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


def check_scaling_request(corpus, reference_ids: Sequence[str] | None, k: int,
                          templates: Sequence[int | str] | None = None, dataset: str | None = None) -> None:
    """The checks that need no caption (`k`, the reference ids, the templates): run before captioning, which is
    the expensive step."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (targets per reference) must be a positive integer, got {k!r}: k=0 generates no "
                         "triplet.")
    if reference_ids is not None:
        known = set(corpus["image_id"])
        unknown = [r for r in dict.fromkeys(reference_ids) if r not in known]
        if unknown:
            raise ValueError(f"{len(unknown)} reference ids are not in the corpus (first: {unknown[:5]}).")
    resolve_templates(templates, dataset)


def caption_images(corpus, captioner, cache_dir: str | Path | None = None, shard_size: int = 1000,
                   batch_size: int = 32, show_progress_bar: bool = True,
                   skip_empty_captions: bool = False) -> dict[str, str]:
    """Caption step: `{image_id: caption}` of the images to pair, in corpus order (first row of each id).

    The captions are cached in `cache_dir` (resumable; a temporary directory by default). An empty caption would
    make a garbage modification text (`" instead of "`), so it is an error naming the images;
    `skip_empty_captions=True` leaves those images out instead (counted in the log)."""
    image_ids = list(dict.fromkeys(corpus["image_id"]))
    with tempfile.TemporaryDirectory() as scratch:
        captions = caption_corpus(corpus, captioner, cache_dir or scratch, shard_size, batch_size, show_progress_bar)
    empty = [i for i in image_ids if not isinstance(captions.get(i), str) or not captions[i].strip()]
    if empty and not skip_empty_captions:
        raise ValueError(
            f"The captioner returned an empty caption for {len(empty)} of {len(image_ids)} images (first: "
            f"{empty[:5]}); their modification texts would be garbage (' instead of '). "
            f"{getattr(captioner, 'empty_caption_fix', 'Fix the captioner (prompt, max_new_tokens)')} and rerun (the "
            "cache keeps the other captions), or pass skip_empty_captions=True (--skip_empty_captions) to leave these "
            "images out of pairing."
        )
    if empty:
        logger.warning("Skipping %d images with empty captions (first: %s): they are left out of pairing.",
                       len(empty), empty[:5])
    dropped = set(empty)
    return {i: captions[i] for i in image_ids if i not in dropped}


def pair_images(corpus, image_ids: Sequence[str], encoder=None, reference_ids: Sequence[str] | None = None,
                rank_window: tuple[int, int] | None = (10000, 20000), k: int = 1, seed: int = 42,
                num_triplets: int | None = None, batch_size: int = 32, backend: str = "torch",
                show_progress_bar: bool = True) -> list[Pair]:
    """Pair step: `(reference, target)` pairs of indices into `image_ids` (images of `corpus`).

    `rank_window=(rank_min, rank_max)`: each reference gets `k` targets whose rank in its similarity ranking
    (`encoder`: an object with `encode_pixels`, `image_processor` and `device`, e.g. an `EmbeddingAdapter`; the
    paper: Unicom ViT-L/14) lies in the window; None: `k` targets at random (no encoder). `reference_ids`: only
    these images are references (those not in `image_ids` are skipped). `num_triplets`: keep a random subset of
    this many pairs (the original's `--K`)."""
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    references = None if reference_ids is None else [position[r] for r in dict.fromkeys(reference_ids)
                                                     if r in position]
    if rank_window is None:
        pairs = random_pairs(len(image_ids), references, k, seed)
    else:
        if encoder is None:
            raise ValueError("Rank-window pairing needs an image encoder (or pass rank_window=None for random pairs).")
        embeddings = encode_images(encoder.encode_pixels, ImageStore(corpus), image_ids, encoder.image_processor,
                                   batch_size, device=encoder.device, desc="images for pairing",
                                   show_progress_bar=show_progress_bar)
        pairs = rank_window_pairs(embeddings, references, rank_window[0], rank_window[1], k, seed,
                                  backend=backend, show_progress_bar=show_progress_bar)
    if not pairs:
        how = "random pairs" if rank_window is None else f"rank window {rank_window}"
        raise ValueError(f"No triplet was generated from {len(image_ids)} images ({how}, k={k}); use a larger "
                         "corpus, or a rank window inside it.")
    if num_triplets is None:
        return pairs
    if not 0 < num_triplets <= len(pairs):
        raise ValueError(f"num_triplets={num_triplets} but {len(pairs)} triplets were generated; pass at most "
                         f"{len(pairs)} (or None for all).")
    return [pairs[i] for i in sorted(random.Random(seed).sample(range(len(pairs)), num_triplets))]


def _categories(corpus) -> dict[str, str]:
    return dict(zip(corpus["image_id"], corpus["category"])) if "category" in corpus.column_names else {}


def compose_triplets(corpus, pairs: Sequence[Pair], image_ids: Sequence[str], captions: dict[str, str],
                     templates: Sequence[str], tokenizer=None, max_length: int | None = 77) -> list[dict]:
    """Compose step: one scaled triplet per pair, its modification texts the `templates` filled with the two
    captions (a text over `max_length` tokens of `tokenizer` falls back to `"{1}"`); `category` is the
    reference's (FashionIQ)."""
    category = _categories(corpus)
    triplets = []
    for pair in pairs:
        reference, target = image_ids[pair.reference], image_ids[pair.target]
        texts = compose_modification_texts(captions[reference], captions[target], templates, tokenizer, max_length)
        triplets.append(_scaled_triplet(reference, target, texts, captions, pair.rank, category))
    return triplets


def _scaled_triplet(reference: str, target: str, texts: list[str], captions: dict[str, str] | None, rank: int,
                    category: dict[str, str]) -> dict:
    """One row of the scaled-triplets schema (captions None: written without captions)."""
    captions = captions or {}
    return {"reference_id": reference, "target_id": target, "modification_texts": texts, "source": "generated",
            "reference_caption": captions.get(reference), "target_caption": captions.get(target), "pair_rank": rank,
            "category": category.get(reference)}


def used_captions(triplets: Iterable[dict]) -> dict[str, str | None]:
    """`{image_id: caption}` of the images `triplets` use, in order of first use (None: written without one)."""
    captions = {}
    for t in triplets:
        captions.setdefault(t["reference_id"], t["reference_caption"])
        captions.setdefault(t["target_id"], t["target_caption"])
    return captions


def write_scaled_triplets(output_dir: str | Path, corpus, triplets: list[dict], description: str,
                          overwrite: bool = False, protect: Iterable[str | Path | None] = ()) -> ScaledTriplets:
    """Write step: `triplets` and the images they use (with their captions) as a dataset in `output_dir`, its
    card saying how they were made (`description`, see `describe_scaling`)."""
    images, category = ImageStore(corpus), _categories(corpus)
    captions = used_captions(triplets)
    corpus_rows = []
    for image_id, caption in captions.items():
        data, name = images.raw(image_id)
        corpus_rows.append({"image_id": image_id, "image_bytes": data, "image_name": name and Path(name).name,
                            "caption": caption, "category": category.get(image_id)})
    split = {"train": SplitData(corpus=corpus_rows, triplets=triplets)}
    card = f"""# Scaled triplets (SPN positive scaling)

Generated with `spn4cir` (`datasets_scripts.positive_scaling`): {description}. `source` = "generated".

{counts_table(split)}"""
    path = write_cir_dataset(output_dir, split, corpus_extra=SCALED_CORPUS_EXTRA, triplet_extra=SCALED_TRIPLET_EXTRA,
                             card=card, tool=TOOL, overwrite=overwrite, protect=protect)
    return ScaledTriplets(triplets, captions, path)


def describe_scaling(captioned_by: str, rank_window: tuple[int, int] | None, k: int, seed: int,
                     templates: Sequence[str], num_triplets: int | None = None) -> str:
    """The dataset card's line on how the triplets were made."""
    pairing, subset = _pairing_words(rank_window, num_triplets)
    return (f"captions by `{captioned_by}`,\n{pairing}, k={k}, seed={seed}, templates {list(templates)}{subset}")


def _pairing_words(rank_window: tuple[int, int] | None, num_triplets: int | None) -> tuple[str, str]:
    """How the pairs were chosen and subsampled, for the dataset card."""
    pairing = "random pairs" if rank_window is None else f"rank window [{rank_window[0]}, {rank_window[1]})"
    return pairing, "" if num_triplets is None else f", a random subset of {num_triplets} triplets"


def scale_positives(corpus, captions: dict[str, str], output_dir: str | Path, encoder=None, dataset: str | None = None,
                    reference_ids: Sequence[str] | None = None,
                    rank_window: tuple[int, int] | None = (10000, 20000), k: int = 1,
                    templates: Sequence[int | str] | None = None, seed: int = 42, num_triplets: int | None = None,
                    tokenizer=None, max_length: int | None = 77, batch_size: int = 32, backend: str = "torch",
                    show_progress_bar: bool = True, overwrite: bool = False,
                    protect: Iterable[str | Path | None] = (), captioned_by: str = "a captioner") -> ScaledTriplets:
    """Pair -> compose -> write, on `captions` (`{image_id: caption}`, e.g. from `caption_images`) of images of
    `corpus`; images without a caption are left out of pairing. The arguments are `generate_scaled_triplets`'s;
    `captioned_by` names the captioner on the dataset card, `protect` the inputs `output_dir` must not hold."""
    check_scaling_request(corpus, reference_ids, k, templates, dataset)
    check_output_dir(output_dir, TOOL, overwrite, protect)
    image_ids = [i for i in dict.fromkeys(corpus["image_id"]) if i in captions]
    pairs = pair_images(corpus, image_ids, encoder, reference_ids, rank_window, k, seed, num_triplets, batch_size,
                        backend, show_progress_bar)
    template_strings = resolve_templates(templates, dataset)
    triplets = compose_triplets(corpus, pairs, image_ids, captions, template_strings, tokenizer, max_length)
    description = describe_scaling(captioned_by, rank_window, k, seed, template_strings, num_triplets)
    return write_scaled_triplets(output_dir, corpus, triplets, description, overwrite, protect)


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
) -> ScaledTriplets:
    """Caption -> pair -> compose -> write.

    Args:
        corpus: the training images (HF dataset with `image_id`, `image`, optional `category`).
        captioner: a captioner (`datasets_scripts.captioners`).
        output_dir: must be new, empty, or (with `overwrite`) a previous output of this function.
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
    check_scaling_request(corpus, reference_ids, k, templates, dataset)
    check_output_dir(output_dir, TOOL, overwrite, [caption_cache_dir])  # before captioning, not after it
    captions = caption_images(corpus, captioner, caption_cache_dir, shard_size, batch_size, show_progress_bar,
                              skip_empty_captions)
    return scale_positives(corpus, captions, output_dir, encoder, dataset, reference_ids, rank_window, k, templates,
                           seed, num_triplets, tokenizer, max_length, batch_size, backend, show_progress_bar,
                           overwrite, [caption_cache_dir], type(captioner).__name__)


def generate_edited_triplets(
    corpus,
    editor,
    output_dir: str | Path,
    encoder=None,
    reference_ids: Sequence[str] | None = None,
    rank_window: tuple[int, int] | None = (10000, 20000),
    k: int = 1,
    seed: int = 42,
    num_triplets: int | None = None,
    captions: dict[str, str] | None = None,
    edit_cache_dir: str | Path | None = None,
    batch_size: int = 32,
    shard_size: int = 1000,
    backend: str = "torch",
    show_progress_bar: bool = True,
    overwrite: bool = False,
    protect: Iterable[str | Path | None] = (),
) -> ScaledTriplets:
    """Pair -> write each pair's modification text from both images -> write: positive scaling with texts by an
    edit writer (`datasets_scripts.edit_writer`, e.g. `MLLMEditWriter`) instead of templates over two captions.

    The arguments are `generate_scaled_triplets`'s; `captions` (optional, e.g. from `caption_images`) are recorded
    with the triplets and restrict pairing to the captioned images; `edit_cache_dir` keeps the texts (resume after
    a crash; a temporary directory by default). Each triplet has one modification text, the editor's. An empty
    text is an error naming the pairs."""
    check_scaling_request(corpus, reference_ids, k)
    check_output_dir(output_dir, TOOL, overwrite, [edit_cache_dir, *protect])  # before the expensive steps
    image_ids = [i for i in dict.fromkeys(corpus["image_id"]) if captions is None or i in captions]
    pairs = pair_images(corpus, image_ids, encoder, reference_ids, rank_window, k, seed, num_triplets, batch_size,
                        backend, show_progress_bar)
    id_pairs = [(image_ids[p.reference], image_ids[p.target]) for p in pairs]
    with tempfile.TemporaryDirectory() as scratch:
        texts = write_edits(corpus, id_pairs, editor, edit_cache_dir or scratch, shard_size, batch_size,
                            show_progress_bar)
    empty = [pair for pair, text in zip(id_pairs, texts) if not isinstance(text, str) or not text.strip()]
    if empty:
        raise ValueError(f"The edit writer returned an empty text for {len(empty)} of {len(id_pairs)} pairs (first: "
                         f"{empty[:3]}); fix its prompt or max_new_tokens and rerun (the cache keeps the other texts).")
    category = _categories(corpus)
    triplets = [_scaled_triplet(r, t, [text], captions, pair.rank, category)
                for (r, t), text, pair in zip(id_pairs, texts, pairs)]
    pairing, subset = _pairing_words(rank_window, num_triplets)
    writer = getattr(editor, "name", type(editor).__name__)
    description = (f"modification texts written from both images by `{writer}` (prompt "
                   f"{getattr(editor, 'prompt', None)!r}),\n{pairing}, k={k}, seed={seed}{subset}")
    return write_scaled_triplets(output_dir, corpus, triplets, description, overwrite, [edit_cache_dir, *protect])
