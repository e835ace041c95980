"""The collator of both SPN stages (and the per-image keys it uses for duplicate masking)."""

from __future__ import annotations

import hashlib
import random

import torch

from modeling_spn4cir.image_store import ImageStore

from .text import compose_text, describe_triplet, tokenize
from .text_tokens import TokenizedTexts, row_random


def image_key(image_id: str) -> int:
    """A stable int64 key of an image id (the same on every rank), for duplicate-target masking."""
    return int.from_bytes(hashlib.blake2b(image_id.encode(), digest_size=8).digest(), "little", signed=True)


def check_training_triplets(triplets, images: ImageStore | None = None, what: str = "the training data",
                            targets: bool = True) -> None:
    """Every training triplet has a reference and a target the corpus holds and at least one non-empty modification
    text; otherwise an error naming the rows (the first ones) and the fix, when the data is loaded rather than at the
    step whose batch holds the row. Reads only the three columns. `targets=False` (evaluation splits: a test split
    has none) checks only the targets given."""
    columns = {c: list(triplets[c]) for c in ("reference_id", "target_id", "modification_texts")}
    rows = range(len(columns["reference_id"]))
    problems = {
        "has no modification text (every text is empty)":
            [i for i in rows if not any(isinstance(t, str) and t.strip() for t in columns["modification_texts"][i] or [])],
        "has no target_id (a test split has none: train on a split with targets)":
            [i for i in rows if targets and columns["target_id"][i] is None],
        "has no reference_id": [i for i in rows if columns["reference_id"][i] is None],
    }
    if images is not None:
        for column in ("reference_id", "target_id"):
            problems[f"names a {column.split('_')[0]} image the corpus does not hold (add the image to the "
                     "dataset's corpus config, or drop the triplet)"] = [
                i for i in rows if columns[column][i] is not None and columns[column][i] not in images]
    for problem, bad in problems.items():
        if bad:
            first = {"row_index": bad[0], "reference_id": columns["reference_id"][bad[0]],
                     "target_id": columns["target_id"][bad[0]]}
            raise ValueError(
                f"{describe_triplet(first)} of {what} {problem}; {len(bad)} such triplet(s) (rows "
                f"{', '.join(map(str, bad[:10]))}{' ...' if len(bad) > 10 else ''}; modification_texts of the first: "
                f"{columns['modification_texts'][bad[0]]!r}). Fix or drop them in the dataset.")


def triplet_text_mode(row: dict, join_annotated_captions: bool) -> str:
    """FashionIQ's annotated captions are joined; generated template variants are alternatives."""
    return "join" if join_annotated_captions and row.get("source", "annotated") == "annotated" else "choice"


class CIRCollator:
    """
    Batches triplet rows (`reference_id`, `target_id`, `modification_texts`, `source`) for a stage.

    - `stage="in_batch"`: `input_ids`, `attention_mask` `[B, L]` (dynamic padding), `pixel_values` and
      `target_pixel_values` `[B, 3, S, S]`, `target_keys` `[B]`.
    - `stage="candidate_bank"`: `input_ids`, `attention_mask`, `reference_features` `[B, ...]` read from the
      bank, `target_index` `[B]` rows of the bank. No image is decoded or encoded.

    `cache_images=True` keeps each preprocessed image (`[3, S, S]`) after its first use, so later epochs decode and
    resize nothing; the batches are the same (preprocessing is per image and deterministic).

    Training texts are randomized like the original code (FashionIQ's 4-way caption join, a random template
    variant for generated triplets). Each row's draw is a pure function of `(seed, epoch, row_index)` when the
    rows carry a `row_index` (the trainer adds it): the Trainer's dataloader collates batches ahead of the
    step that uses them, so a sequential random stream could not be checkpointed at the right point, and a
    resumed run would draw different texts.

    `texts` ([`TokenizedTexts`] over the training rows, numbered by `row_index`; the trainer builds it) makes a
    batch's tokens a gather and a pad of texts tokenized once, with the same draws and the same tensors as
    tokenizing each batch.
    """

    def __init__(self, tokenizer, stage: str, image_processor=None, images: ImageStore | None = None, bank=None,
                 join_annotated_captions: bool = False, training: bool = True, max_length: int | None = None,
                 dedup_map: dict[str, str] | None = None, seed: int = 0, cache_images: bool = False,
                 texts: TokenizedTexts | None = None):
        if stage == "in_batch" and (image_processor is None or images is None):
            raise ValueError("Stage 'in_batch' needs an image_processor and the corpus images.")
        if stage == "candidate_bank" and bank is None:
            raise ValueError("Stage 'candidate_bank' needs the candidate bank.")
        self.tokenizer, self.stage = tokenizer, stage
        self.image_processor, self.images, self.bank = image_processor, images, bank
        self.join_annotated_captions = join_annotated_captions
        self.training = training
        self.max_length = max_length
        self.dedup_map = dedup_map or {}
        self.seed = seed
        self.epoch = 0
        self._stream = random.Random(seed)
        self._pixels: dict[str, torch.Tensor] | None = {} if cache_images else None
        if texts is not None and texts.seed != seed:
            raise ValueError(f"The tokenized texts draw with seed {texts.seed}, the collator with {seed}.")
        self.texts = texts

    def _rng(self, row: dict) -> random.Random:
        if "row_index" in row:
            return row_random(self.seed, self.epoch, row["row_index"])
        return self._stream

    def _pixel_values(self, image_ids: list[str]) -> torch.Tensor:
        """`[B, 3, S, S]` preprocessed images, from the cache where it holds them."""
        if self._pixels is None:
            return self.image_processor(self.images.images(image_ids), return_tensors="pt")["pixel_values"]
        missing = [i for i in dict.fromkeys(image_ids) if i not in self._pixels]
        if missing:
            values = self.image_processor(self.images.images(missing), return_tensors="pt")["pixel_values"]
            self._pixels.update((i, v.clone()) for i, v in zip(missing, values))  # a clone: not a view of the batch
        return torch.stack([self._pixels[i] for i in image_ids])

    def _tokens(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if self.texts is not None and self.training and all("row_index" in r for r in rows):
            return self.texts.batch([r["row_index"] for r in rows], self.epoch)
        texts = [
            compose_text(r["modification_texts"], triplet_text_mode(r, self.join_annotated_captions), self.training,
                         self._rng(r), describe_triplet(r))
            for r in rows
        ]
        return tokenize(self.tokenizer, texts, self.max_length)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self._tokens(rows)
        references = [r["reference_id"] for r in rows]
        targets = [r["target_id"] for r in rows]
        untargeted = [describe_triplet(r) for r in rows if r["target_id"] is None]
        if untargeted:
            raise ValueError(f"{len(untargeted)} training triplets of this batch have no target_id (first: "
                             f"{untargeted[0]}): a test split has none; train on a split with targets.")
        if self.stage == "in_batch":
            batch["pixel_values"] = self._pixel_values(references)
            batch["target_pixel_values"] = self._pixel_values(targets)
            batch["target_keys"] = torch.tensor([image_key(self.dedup_map.get(t, t)) for t in targets])
        else:
            batch["reference_features"] = self.bank.reference_features[self.bank.indices(references)]
            batch["target_index"] = torch.tensor(self.bank.indices(targets))
        return batch


def tokenize_training_texts(triplets, text_processor, join_annotated_captions: bool = False,
                            max_length: int | None = None, seed: int = 0) -> TokenizedTexts:
    """[`TokenizedTexts`] of a training triplets dataset (rows numbered by position, as the trainer's `row_index`),
    with the collator's text modes."""
    columns = triplets.column_names
    sources = list(triplets["source"]) if "source" in columns else ["annotated"] * len(triplets)
    modes = [triplet_text_mode({"source": s}, join_annotated_captions) for s in sources]
    return TokenizedTexts(list(triplets["modification_texts"]), modes, text_processor, max_length, seed,
                          describe=lambda i: describe_triplet(triplets[i], i))
