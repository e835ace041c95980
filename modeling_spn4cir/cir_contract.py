"""The CIR model contract that every family implements, and what the families share to implement it.

Every model family (`clip4cir/`, `tgcir/`, `blip4cir/`, `sprc/`) mixes [`CIRModelMixin`] into its
`PreTrainedModel` and provides:

| method | returns |
|---|---|
| `get_reference_features(pixel_values)` | what the query side consumes, any shape `[N, ...]`: a vector `[N, D]` (CLIP4CIR), tokens `[N, T, H]` (TG-CIR, BLIP4CIR), ... |
| `target_embeds_from_reference_features(reference_features)` | the target embeddings of the same images: `[N, D]` or `[N, Q, D]` (multi-vector targets, e.g. SPRC's Q-Former tokens), L2-normalized |
| `get_query_embeds(input_ids, attention_mask, reference_features=None, pixel_values=None)` | `[B, D]`, L2-normalized |
| `similarity(query_embeds, target_embeds)` | `[B, N]`: the one scoring rule of training (both stages), the bank, evaluation, pairing and retrieval |
| `query_side_modules()` | `{name: module}` that SPN's stage 2 trains (the original's stage-2 optimizer, restricted to what gets gradient) |
| `forward(...)` | a [`CIRModelOutput`]: embeddings and `logits`; the losses live in `trainers.losses` |

The mixin derives the rest from those: `get_target_embeds(pixel_values)` and
`get_target_embeds_and_reference_features(pixel_values)` (one image pass for both roles: in every family the target
embedding is a function of the image's reference features), `query_side_parameters()`, `freeze_target_side()`
(stage 2: no gradient and eval mode outside the query side), `get_temperature()` and `similarity` (dot product, or
the max over target tokens for `[N, Q, D]` targets).

Families import this module as `from .cir_contract import ...` and their folder holds a link to this file: so it
lives once in the repository, and `save_pretrained` still copies it beside the family's code for
`trust_remote_code` loading without the package. The family's `__init__` makes both names one module object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import BatchFeature
from transformers.utils import ModelOutput


@dataclass
class CIRModelOutput(ModelOutput):
    """
    Output of a CIR model's `forward`.

    Args:
        logits (`torch.FloatTensor` of shape `[B, N_t]`, *optional*):
            `similarity(query_embeds, target_embeds) / temperature`; only when targets are given.
        query_embeds (`torch.FloatTensor` of shape `[B, D]`):
            L2-normalized composed queries.
        target_embeds (`torch.FloatTensor` of shape `[N_t, D]` or `[N_t, Q, D]`, *optional*):
            L2-normalized target embeddings.
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Never computed by the model: `CIRTrainer` computes SPN's losses with the modules of `trainers.losses`
            (gathered across processes, duplicates masked). Kept so that the output fits `transformers.Trainer`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    query_embeds: torch.FloatTensor | None = None
    target_embeds: torch.FloatTensor | None = None


def dot_similarity(query_embeds: torch.Tensor, target_embeds: torch.Tensor) -> torch.Tensor:
    """`[B, D] x [N, D] -> [B, N]` dot products (cosine for normalized inputs), in the query's dtype."""
    return query_embeds @ target_embeds.to(query_embeds.dtype).T


def max_token_similarity(query_embeds: torch.Tensor, target_embeds: torch.Tensor) -> torch.Tensor:
    """`[B, D] x [N, Q, D] -> [B, N]`: `score[b, n] = max_q query[b] . target[n, q]` (SPRC, BLIP-2)."""
    target = target_embeds.to(query_embeds.dtype)
    return torch.einsum("bd,nqd->bnq", query_embeds, target).amax(dim=-1)


class CIRModelMixin:
    """Shared half of the CIR model contract; see the module docstring for what a family must provide."""

    # --------------------------------------------------------------------------------- to override
    def query_side_modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError(f"{type(self).__name__} must say which modules its stage 2 trains.")

    def similarity(self, query_embeds: torch.Tensor, target_embeds: torch.Tensor) -> torch.Tensor:
        """`query_embeds` `[B, D]`, `target_embeds` `[N, D]` (or `[N, Q, D]` where a family scores tokens) ->
        scores `[B, N]`. Dot product of normalized embeddings by default."""
        if target_embeds.ndim == 3:
            return max_token_similarity(query_embeds, target_embeds)
        return dot_similarity(query_embeds, target_embeds)

    def get_temperature(self) -> float | torch.Tensor:
        """InfoNCE temperature: `config.temperature`, or a learnable tensor where the family trains it."""
        return self.config.temperature

    def target_embeds_from_reference_features(self, reference_features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must map reference features to target embeddings.")

    # ---------------------------------------------------------------------------------- derived
    def get_target_embeds(self, pixel_values: torch.FloatTensor) -> torch.Tensor:
        """`pixel_values` `[N, 3, S, S]` -> L2-normalized target embeddings `[N, D]` or `[N, Q, D]`."""
        return self.target_embeds_from_reference_features(self.get_reference_features(pixel_values))

    def get_target_embeds_and_reference_features(self, pixel_values: torch.FloatTensor):
        """Both image-side outputs of `pixel_values` `[N, 3, S, S]` from one image pass: (target embeddings,
        reference features) — what the candidate bank and the evaluator store."""
        reference_features = self.get_reference_features(pixel_values)
        return self.target_embeds_from_reference_features(reference_features), reference_features

    def query_side_parameters(self) -> list[nn.Parameter]:
        """Parameters stage 2 trains (never the target side), each once."""
        seen, out = set(), []
        for module in self.query_side_modules().values():
            for parameter in (module.parameters() if isinstance(module, nn.Module) else [module]):
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    out.append(parameter)
        return out

    def target_side_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers outside `query_side_parameters()`: what produces target embeddings and reference
        features, so what a candidate bank's or a gallery index's fingerprint must cover."""
        query_side = {id(p) for p in self.query_side_parameters()}
        names = {name for name, p in self.named_parameters() if id(p) in query_side}
        return {k: v for k, v in self.state_dict().items() if k not in names}

    def freeze_target_side(self) -> None:
        """Stage 2: stop gradients into everything but `query_side_parameters()`, and keep every module that
        holds no query-side parameter in eval mode, so that BatchNorm statistics and dropout of the frozen
        towers cannot change the bank's inputs either."""
        query_side = {id(p) for p in self.query_side_parameters()}
        for parameter in self.parameters():
            parameter.requires_grad_(id(parameter) in query_side)
        self._target_side_frozen = True
        self.train(self.training)

    def _frozen_modules(self) -> list[nn.Module]:
        query_side = {id(p) for p in self.query_side_parameters()}
        query_modules = {id(m) for m in self.query_side_modules().values() if isinstance(m, nn.Module)}
        frozen = []
        for _, child in self.named_children():
            if id(child) in query_modules:
                continue
            if not any(id(p) in query_side for p in child.parameters()):
                frozen.append(child)
        return frozen

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "_target_side_frozen", False):
            for module in self._frozen_modules():
                module.eval()
        return self

    def cir_output(self, query_embeds: torch.Tensor, target_embeds: torch.Tensor | None) -> CIRModelOutput:
        """The `forward` result: embeddings, and `similarity / temperature` logits when targets are given."""
        logits = None
        if target_embeds is not None:
            logits = self.similarity(query_embeds, target_embeds) / self.get_temperature()
        return CIRModelOutput(logits=logits, query_embeds=query_embeds, target_embeds=target_embeds)


class CIRProcessorMixin:
    """The call every family's processor shares: `processor(images=..., text=...)` -> `pixel_values` `[N, 3, S, S]`
    and/or `input_ids`, `attention_mask` `[B, L]`. A family sets `text_defaults` (tokenizer keyword defaults:
    its padding, truncation) and overrides `encode_text` for its own text handling (SPRC's caption cleaning,
    BLIP4CIR's `[ENC]`)."""

    text_defaults: dict = {"padding": True, "truncation": True}

    def encode_text(self, text, return_tensors, **kwargs):
        return self.tokenizer(text, return_tensors=return_tensors, **{**self.text_defaults, **kwargs})

    def __call__(self, images=None, text=None, return_tensors: str = "pt", **kwargs):
        if images is None and text is None:
            raise ValueError("Pass `images`, `text` or both.")
        data = {}
        if text is not None:
            data.update(self.encode_text(text, return_tensors, **kwargs))
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors))
        return BatchFeature(data=data, tensor_type=return_tensors)


__all__ = ["CIRModelMixin", "CIRModelOutput", "CIRProcessorMixin", "dot_similarity", "max_token_similarity"]
