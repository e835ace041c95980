"""Which stage-1 loss a model trains with: its family's objective, plain in-batch InfoNCE, or the negative types."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from modeling_spn4cir.families import family_of

from .in_batch import InBatchInfoNCELoss, Similarity
from .negative_types import (
    CROSS_TYPES,
    DEFAULT_NEGATIVE_TYPES,
    NegativeTypeLoss,
    check_negative_types,
)


def stage1_loss_for(model, temperature, similarity: Similarity | None = None,
                    negative_types: Iterable[str] = DEFAULT_NEGATIVE_TYPES) -> nn.Module:
    """The stage-1 loss module for `model`: its config's `stage1_loss`, one of its family's objectives
    (`FamilySpec.stage1_losses`: TG-CIR's six terms, SPRC's itc + rtc + align, Bi-BLIP4CIR's forward + reverse), or
    plain `InBatchInfoNCELoss` (`"in_batch_infonce"`, the default) when the family brings none; with
    `negative_types` other than `target` alone, `NegativeTypeLoss` in place of plain InfoNCE.

    Plain InfoNCE uses `temperature` (the trainer's tau) and the model's `similarity`; a family objective is built
    from the model's config (`from_config`), since it carries its own scales (TG-CIR's `loss_T`, SPRC's `temp`)."""
    types = check_negative_types(negative_types)
    name = getattr(model.config, "stage1_loss", None) or "in_batch_infonce"
    if name == "in_batch_infonce":
        if types == DEFAULT_NEGATIVE_TYPES:
            return InBatchInfoNCELoss(temperature, similarity)
        return negative_type_loss_for(model, types, temperature, similarity)
    spec = family_of(model)
    objectives = dict(spec.stage1_losses) if spec is not None else {}
    if name not in objectives:
        raise ValueError(f"{type(model).__name__} asks for stage-1 loss {name!r} (config.stage1_loss); its family "
                         f"has: {sorted(['in_batch_infonce', *objectives])}.")
    if types != DEFAULT_NEGATIVE_TYPES:
        raise ValueError(f"--negative_types {' '.join(types)}: {type(model).__name__} trains stage 1 with its "
                         f"family's own objective (config.stage1_loss={name!r}), not the in-batch InfoNCE whose "
                         "negatives the types replace. Use --negative_types target, or set "
                         "config.stage1_loss='in_batch_infonce'.")
    return objectives[name].from_config(model.config, temperature)


def negative_type_loss_for(model, negative_types: Iterable[str], temperature,
                           similarity: Similarity | None = None) -> NegativeTypeLoss:
    """`NegativeTypeLoss` for `model`. `text` / `reference` need a fusion of two feature vectors that can compose
    any reference with any text (`model.combine(reference_features, text_features)` and
    `forward(..., return_fusion_features=True)`, CLIP4CIR's): sum fusion in closed form, another (the Combiner)
    in chunks; a family whose fusion attends over tokens is refused, saying why."""
    types = check_negative_types(negative_types)
    cross = [kind for kind in types if kind in CROSS_TYPES]
    if not cross:
        return NegativeTypeLoss(types, temperature, similarity)
    if not callable(getattr(model, "combine", None)):
        raise ValueError(
            f"--negative_types {' '.join(cross)}: these negatives compose every reference of the batch with every "
            f"text (B x B queries). {type(model).__name__} has no fusion of two feature vectors "
            "(`combine(reference_features, text_features)` with `forward(..., return_fusion_features=True)`, as "
            "CLIP4CIR's sum or Combiner): it composes a query inside `get_query_embeds`, attending over the "
            "reference's and the text's tokens together, so each of the B x B pairs would be one more query-side pass "
            "per step, B times stage 1's cost. Use --negative_types target and/or query."
        )
    compose = None if getattr(model.config, "fusion", None) == "sum" else model.combine
    return NegativeTypeLoss(types, temperature, similarity, compose=compose)
