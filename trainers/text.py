"""Turning a triplet's `modification_texts` into the one string the text tower reads.

Two kinds of lists exist in the data model: FashionIQ's annotated triplets carry two captions that describe
the change *together* (they are joined), while generated triplets carry alternative template renderings of
the same change (one is picked). `mode` says which.
"""

import random
from collections.abc import Sequence

TEXT_MODES = ("join", "choice")
_STRIP = ".?, "


def fashioniq_eval_caption(captions: Sequence[str]) -> str:
    """FashionIQ evaluation text: `"c0 and c1"` after stripping `.?, ` (SPN4CIR's validate.py)."""
    if len(captions) == 1:
        return captions[0].strip(_STRIP)
    return f"{captions[0].strip(_STRIP)} and {captions[1].strip(_STRIP)}"


def fashioniq_train_caption(captions: Sequence[str], rng: random.Random) -> str:
    """FashionIQ training text, randomized as the original `generate_randomized_fiq_caption`:
    "c0 and c1", "c1 and c0", "c0" or "c1", each with probability 1/4 (after stripping `.?, `)."""
    return compose_text(captions, "join", True, rng)


def text_variants(texts: Sequence[str], mode: str, training: bool, triplet: str = "a triplet") -> list[str]:
    """Every text a triplet can train (or evaluate) with, in the order `variant_index` draws from.

    `"join"` (FashionIQ's two captions): training gives "c0 and c1", "c1 and c0", "c0", "c1" (the original's
    `generate_randomized_fiq_caption`; one caption: itself), evaluation "c0 and c1" (`fashioniq_eval_caption`).
    `"choice"` (alternatives: CIRR, CIRCO, generated): training any of them, evaluation the first.
    """
    if not texts:
        raise ValueError(f"{triplet} has no modification text (modification_texts is {texts!r}); every triplet "
                         "needs at least one: fix or drop it in the dataset.")
    if mode not in TEXT_MODES:
        raise ValueError(f"text mode must be one of {TEXT_MODES}, got {mode!r}.")
    if mode == "choice":
        return list(texts) if training else [texts[0]]
    if not training:
        return [fashioniq_eval_caption(texts)]
    if len(texts) == 1:
        return [texts[0].strip(_STRIP)]
    c0, c1 = texts[0].strip(_STRIP), texts[1].strip(_STRIP)
    return [f"{c0} and {c1}", f"{c1} and {c0}", c0, c1]


def variant_index(num_variants: int, mode: str, training: bool, rng: random.Random | None = None) -> int:
    """Which of `text_variants` a training row uses: uniform, one draw from `rng` (none for evaluation or for a
    FashionIQ triplet with one caption, as the original)."""
    if not training or (mode == "join" and num_variants == 1):
        return 0
    return (rng or random).randrange(num_variants)


def compose_text(texts: Sequence[str], mode: str, training: bool, rng: random.Random | None = None,
                 triplet: str = "a triplet") -> str:
    """One modification text from a triplet's list: `text_variants(...)[variant_index(...)]`.

    Args:
        texts: the triplet's `modification_texts` (at least one).
        mode: `"join"` (FashionIQ's two captions) or `"choice"` (alternatives: CIRR, CIRCO, generated).
        training: randomize (as the original training code) instead of the deterministic evaluation text.
        rng: the random source for training.
        triplet: which triplet this is, for the error message (e.g. `describe_triplet(row)`).
    """
    variants = text_variants(texts, mode, training, triplet)
    return variants[variant_index(len(variants), mode, training, rng)]


def describe_triplet(row: dict, index: int | None = None) -> str:
    """`"triplet 12 (reference 'B00X', target 'B00Y')"`: how errors name a triplet row."""
    number = row.get("row_index", index)
    where = f"triplet {number}" if number is not None else "a triplet"
    target = f", target {row['target_id']!r}" if "target_id" in row else ""
    return f"{where} (reference {row.get('reference_id')!r}{target})"


def tokenize(text_processor, texts: Sequence[str], max_length: int | None = None) -> dict:
    """`input_ids`, `attention_mask` `[B, L]` for `texts`.

    `text_processor` is a family's processor or a bare tokenizer, called with `text=`. A processor applies the
    family's own text handling and padding (SPRC's caption cleaning, BLIP4CIR's `[ENC]` token, TG-CIR's padding to
    the context length, which its text tower averages over); a bare tokenizer pads to the longest text.
    """
    from transformers.processing_utils import ProcessorMixin

    kwargs = {"return_tensors": "pt"}
    if not isinstance(text_processor, ProcessorMixin):
        kwargs |= {"padding": True, "truncation": True}
    if max_length is not None:
        kwargs["max_length"] = max_length
    out = text_processor(text=list(texts), **kwargs)
    return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}
