"""BLIP4CIR's stage-1 objective with the optional "+Bi" reversed-query term of Bi-BLIP4CIR.

SPN4CIR's own `blip4cir/` has no reverse path: this option comes from Bi-BLIP4CIR (Liu et al., WACV 2024,
Cuberick-Orion/Bi-Blip4CIR), whose training loss is `loss_forward + 0.4 * loss_reversed`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import ddp_mean_correction, gather_no_grad, gather_with_grad, world

_BI_BLIP4CIR_CITATION = """@inproceedings{liu2024bi,
  title     = {Bi-directional Training for Composed Image Retrieval via Text Prompt Learning},
  author    = {Liu, Zheyuan and Sun, Weixuan and Hong, Yicong and Teney, Damien and Gould, Stephen},
  booktitle = {WACV},
  year      = {2024}
}"""


def in_batch_infonce(query_embeds: torch.Tensor, candidate_embeds: torch.Tensor, temperature,
                     candidate_keys: torch.Tensor | None = None) -> torch.Tensor:
    """`mean_i CE(q_i . [c_1 .. c_B_global]^T / tau, i)`: candidates gathered across processes with autograd,
    labels offset by the rank's position; a candidate image equal to the positive (same key) is masked, not
    counted as a negative. `temperature` may be a tensor (learnable).

    The logits are computed in fp32 outside autocast: in fp16, d loss / d tau (~ scores / tau^2, times the
    GradScaler's scale) overflows, and every step would be skipped until the scale has dropped."""
    all_candidates, sizes = gather_with_grad(candidate_embeds)
    offset = sum(sizes[: world()[0]])
    labels = torch.arange(query_embeds.shape[0], device=query_embeds.device) + offset
    with torch.autocast(device_type=query_embeds.device.type, enabled=False):
        logits = query_embeds.float() @ all_candidates.float().T / temperature
    if candidate_keys is not None:
        all_keys = gather_no_grad(candidate_keys, sizes)
        same_image = candidate_keys[:, None] == all_keys[None, :]
        same_image[torch.arange(len(labels), device=labels.device), labels] = False
        logits = logits.masked_fill(same_image, float("-inf"))
    return F.cross_entropy(logits, labels)


class BLIP4CIRBidirectionalLoss(nn.Module):
    """
    Stage 1 of BLIP4CIR with Bi-BLIP4CIR's bi-directional training ("+Bi").

        loss = InfoNCE(q_fwd, targets) + reverse_weight * InfoNCE(q_rev, references)

    - forward: composed query (reference image tokens + text) against the global in-batch targets, duplicates
      of the positive target masked (as `InBatchInfoNCELoss`);
    - reverse: the model's reversed query (target image tokens + learnable reversal token + the same text) must
      retrieve its reference image among the in-batch references (`normalize(vision_proj(reference CLS))`).

    The temperature is the model's learnable `tau` (`outputs.temperature`, carried by the forward output so that
    it trains under DDP); `use_model_temperature=False` uses the fixed `temperature` instead.

    Inputs: the output of `BLIP4CIRModel.forward(..., **self.model_kwargs)` for a stage-1 batch (`query_embeds`,
    `target_embeds` `[B, E]`; `reverse_query_embeds`, `reference_embeds` `[B, E]` when the model was built with
    `bidirectional=True`), and optional `target_keys` `[B]` int64 for duplicate masking of the forward term.
    `bidirectional=None` adds the reverse term exactly when the model returns it (i.e. follows the model's
    `config.bidirectional`, off by default); `True` requires it, `False` ignores it.

    Reference: Liu et al., "Bi-directional Training for Composed Image Retrieval via Text Prompt Learning",
    WACV 2024 (code: Cuberick-Orion/Bi-Blip4CIR; total loss `loss_f + .4 * loss_r`).
    """

    def __init__(self, temperature: float = 0.03, reverse_weight: float = 0.4, bidirectional: bool | None = None,
                 use_model_temperature: bool = True):
        super().__init__()
        if reverse_weight < 0:
            raise ValueError(f"reverse_weight must be non-negative, got {reverse_weight}.")
        self.temperature = temperature
        self.reverse_weight = reverse_weight
        self.bidirectional = bidirectional
        self.use_model_temperature = use_model_temperature

    @classmethod
    def from_config(cls, config, temperature: float | None = None, **options) -> BLIP4CIRBidirectionalLoss:
        """The loss for a `BLIP4CIRConfig` (what `trainers.losses.stage1_loss_for` calls): the reverse term
        follows `config.bidirectional`; the temperature is the model's learnable `tau` (carried by the forward
        output), `temperature` (else `config.temperature`) only where an output carries none."""
        options.setdefault("bidirectional", bool(getattr(config, "bidirectional", False)))
        if temperature is None:
            temperature = getattr(config, "temperature", 0.03)
        return cls(temperature=temperature, **options)

    @property
    def model_kwargs(self) -> dict:
        """Extra `model(...)` arguments: ask the model for the reversed queries unless the option is off."""
        return {} if self.bidirectional is False else {"return_reverse_terms": True}

    def _temperature(self, outputs):
        model_temperature = getattr(outputs, "temperature", None)
        if self.use_model_temperature and model_temperature is not None:
            return model_temperature
        return self.temperature

    def forward(self, outputs, target_keys: torch.Tensor | None = None) -> torch.Tensor:
        # Each term is a mean over this rank's rows: weigh it by its share of the global batch under DDP.
        return self._loss(outputs, target_keys) * ddp_mean_correction(len(outputs.query_embeds))

    def _loss(self, outputs, target_keys: torch.Tensor | None = None) -> torch.Tensor:
        if outputs.target_embeds is None:
            raise ValueError("BLIP4CIRBidirectionalLoss needs the targets: call the model with target_pixel_values.")
        temperature = self._temperature(outputs)
        loss = in_batch_infonce(outputs.query_embeds, outputs.target_embeds, temperature, target_keys)
        reverse_query = getattr(outputs, "reverse_query_embeds", None)
        if self.bidirectional is False or self.reverse_weight == 0:
            return loss
        if reverse_query is None:
            if self.bidirectional:
                raise ValueError(
                    "bidirectional=True but the model returned no reversed queries: build it with "
                    "BLIP4CIRConfig(bidirectional=True) and pass target_pixel_values."
                )
            return loss
        reverse = in_batch_infonce(reverse_query, outputs.reference_embeds, temperature)
        return loss + self.reverse_weight * reverse

    def get_config_dict(self) -> dict:
        return {
            "temperature": "model tau" if self.use_model_temperature else self.temperature,
            "reverse_weight": self.reverse_weight,
            "bidirectional": "follows the model" if self.bidirectional is None else self.bidirectional,
        }

    @property
    def citation(self) -> str:
        return _BI_BLIP4CIR_CITATION


__all__ = ["BLIP4CIRBidirectionalLoss", "in_batch_infonce"]
