"""The training texts tokenized once, before the first step.

Every text a triplet row can train with (`trainers.text.text_variants`: FashionIQ's four joins, each generated
template variant) is tokenized once, stored flat, and a batch becomes a gather and a pad: no tokenizer runs per
step. Which variant a row uses in an epoch is the collator's draw (`row_random(seed, epoch, row_index)`), so the
stage-2 length-grouped order (`trainers.length_groups`) knows every row's length in an epoch before any batch of it
is drawn.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from .text import describe_triplet, text_variants, tokenize, variant_index

_CHUNK = 4096  # texts per tokenizer call while building


def row_random(seed: int, epoch: int, row_index: int) -> random.Random:
    """The random source of one training row's text in one epoch: a pure function of `(seed, epoch, row_index)`, so
    that a resumed run, a dataloader worker and the length-grouped order all draw the same text."""
    return random.Random(f"{seed}-{epoch}-{row_index}")


def _padding_side(text_processor) -> str:
    return getattr(getattr(text_processor, "tokenizer", text_processor), "padding_side", "right")


def _pad_token_id(text_processor):
    return getattr(getattr(text_processor, "tokenizer", text_processor), "pad_token_id", None)


def _fixed_length(text_processor) -> bool:
    """Whether the processor pads every text to one length (TG-CIR's context length, SPRC's 32 tokens): then the
    padding is part of each text's input and is kept; otherwise (dynamic padding) each text keeps its own tokens and
    a batch is padded to its longest text, as the tokenizer pads a batch."""
    return getattr(text_processor, "text_defaults", {}).get("padding") == "max_length"


class TokenizedTexts:
    """
    Token ids of every text variant of every triplet row, stored flat.

    Args:
        texts: per row, its `modification_texts`.
        modes: per row, `"join"` or `"choice"` (`trainers.data.triplet_text_mode`).
        text_processor: the family's processor or a bare tokenizer (as `trainers.text.tokenize`).
        max_length: truncation length (tokens), as the collator's.
        seed: the collator's seed (the text draws are `row_random(seed, epoch, row_index)`).
        describe: `describe(i)` names row i in an error (default: `triplet i`).

    `batch(row_indices, epoch)` equals tokenizing the rows' drawn texts together (`trainers.text.tokenize`): each text
    keeps the tokens it has alone, and a batch is padded to its longest text with the tokenizer's pad id on its
    padding side (the mask 0 there).
    """

    def __init__(self, texts: Sequence[Sequence[str]], modes: Sequence[str], text_processor,
                 max_length: int | None = None, seed: int = 0, describe=None):
        if len(texts) != len(modes):
            raise ValueError(f"{len(texts)} rows of texts but {len(modes)} text modes.")
        describe = describe or (lambda i: describe_triplet({}, i))
        variants = [text_variants(t, m, True, describe(i)) for i, (t, m) in enumerate(zip(texts, modes))]
        self.modes = list(modes)
        self.seed = seed
        self.left = _padding_side(text_processor) == "left"
        self.pad_token_id = _pad_token_id(text_processor)
        counts = torch.tensor([len(v) for v in variants], dtype=torch.long)
        self.first = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])  # row -> its first variant
        flat = [text for row in variants for text in row]
        ids, masks, lengths = [], [], []
        keep_padding = _fixed_length(text_processor)
        self.dtypes = (torch.long, torch.long)
        for start in range(0, len(flat), _CHUNK):
            batch = tokenize(text_processor, flat[start:start + _CHUNK], max_length)
            mask = batch["attention_mask"]
            own = torch.full((mask.shape[0],), mask.shape[1]) if keep_padding else mask.sum(1)
            keep = self._own_positions(own, mask.shape[1])
            self.dtypes = (batch["input_ids"].dtype, mask.dtype)  # what a batch gives back
            ids.append(batch["input_ids"][keep].to(torch.int32))  # stored compact: 5 bytes a token
            masks.append(mask[keep].to(torch.uint8))
            lengths.append(own)
        self.ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int32)
        self.mask = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.uint8)
        self.lengths = torch.cat(lengths) if lengths else torch.zeros(0, dtype=torch.long)  # per variant
        self.starts = torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)])  # variant -> first token
        self._drawn: tuple[int, torch.Tensor] | None = None

    def _own_positions(self, own: torch.Tensor, width: int) -> torch.Tensor:
        """`[n, width]` bool: each row's own tokens (the first `own[i]`, or the last with left padding)."""
        positions = torch.arange(width)[None, :]
        return positions >= width - own[:, None] if self.left else positions < own[:, None]

    def __len__(self) -> int:
        return len(self.modes)

    def drawn(self, epoch: int) -> torch.Tensor:
        """`[num_rows]` the variant (a flat index) each row trains with in `epoch` (cached for the last epoch)."""
        if self._drawn is None or self._drawn[0] != epoch:
            chosen = self.first[:-1].clone()
            counts = self.first[1:] - self.first[:-1]
            for row in torch.nonzero(counts > 1).flatten().tolist():  # one variant: no draw can change it
                chosen[row] += variant_index(int(counts[row]), self.modes[row], True,
                                             row_random(self.seed, epoch, row))
            self._drawn = (epoch, chosen)
        return self._drawn[1]

    def row_lengths(self, epoch: int) -> torch.Tensor:
        """`[num_rows]` tokens of each row's text in `epoch` (with its padding where the processor pads to a fixed
        length): what a batch pads to."""
        return self.lengths[self.drawn(epoch)]

    def batch(self, row_indices: Sequence[int], epoch: int) -> dict[str, torch.Tensor]:
        """`input_ids`, `attention_mask` `[B, L]` of the rows' texts in `epoch`, padded to the longest."""
        variants = self.drawn(epoch)[torch.as_tensor(list(row_indices), dtype=torch.long)]
        lengths = self.lengths[variants]
        width = int(lengths.max()) if len(lengths) else 0
        if bool((lengths != width).any()) and self.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token, so texts of different lengths cannot be batched: set "
                             "tokenizer.pad_token (or pad_token_id) before training.")
        input_ids = torch.full((len(variants), width), self.pad_token_id or 0, dtype=self.dtypes[0])
        attention_mask = torch.zeros((len(variants), width), dtype=self.dtypes[1])
        keep = self._own_positions(lengths, width)
        before = lengths.cumsum(0) - lengths  # where each row's tokens start among the batch's
        tokens = torch.repeat_interleave(self.starts[variants] - before, lengths) + torch.arange(int(lengths.sum()))
        input_ids[keep] = self.ids[tokens].to(input_ids.dtype)
        attention_mask[keep] = self.mask[tokens].to(attention_mask.dtype)
        return {"input_ids": input_ids, "attention_mask": attention_mask}
