"""SPRC's own stage-1 objective (the `forward` of SPRC's `Blip2QformerCirAlignPrompt`), as an `nn.Module`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import ddp_mean_correction, gather_no_grad, gather_with_grad, world

_SPRC_CITATION = """@inproceedings{bai2024sprc,
  title     = {Sentence-level Prompts Benefit Composed Image Retrieval},
  author    = {Bai, Yang and Xu, Xinxing and Liu, Yong and Khan, Salman and Khan, Fahad and Zuo, Wangmeng and
               Goh, Rick Siow Mong and Feng, Chun-Mei},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2024}
}"""


class SPRCStage1Loss(nn.Module):
    """
    SPRC's stage-1 training objective (Bai et al., ICLR 2024; `blip2_qformer_cir_align_prompt.py:forward` of
    chunmeifeng/SPRC, the model SPN4CIR starts its stage 2 from):

        loss = L_itc + rtc_weight * L_rtc + align_weight * L_align

    - `L_itc` (fusion-target contrastive): `CE(max_q f_i . t_j[q] / temp, i)` over the batch's targets, with the
      composed queries `f_i` (`query_embeds` `[B, D]`) and the targets' Q-Former token sets `t_j`
      (`target_embeds` `[B, Q, D]`);
    - `L_rtc` (relative contrastive): the same with the text-only queries `r_i` (`prompt_text_embeds` `[B, D]`:
      `[CLS]` output of the Q-Former on `[CLS] prompt_tokens caption` without image);
    - `L_align`: `MSE(mean_q h_i, mean_q stopgrad(prompt_tokens))` between the pass-1 fusion states
      (`fusion_query_hidden` `[B, Q, H]`) and the learned prompt tokens.

    `temp` is SPRC's learnable temperature (`outputs.temperature`, a model parameter, init 0.07, never clamped);
    pass `temperature=` to fix it instead. The original sums with weights 0.4 / 0.4 on CIRR
    (`clip_finetune_cirr`, `--loss-rtc`/`--loss-align` defaults) and 1 / 1 on FashionIQ (`clip_finetune_fiq`).
    Across processes the target token sets are gathered with autograd (the original is single-GPU); a target
    image that appears twice in the global batch (same `target_keys`) is masked out of the other query's
    negatives (the original counts it as a negative), both for `L_itc` and `L_rtc`.

    Inputs: `outputs` of `SPRCModel.forward(..., return_stage1_terms=True)` on the stage-1 batch, `target_keys` `[B]`.
    """

    def __init__(self, temperature: float | None = None, rtc_weight: float = 0.4, align_weight: float = 0.4,
                 mask_duplicates: bool = True):
        super().__init__()
        self.temperature = temperature
        self.rtc_weight = float(rtc_weight)
        self.align_weight = float(align_weight)
        self.mask_duplicates = bool(mask_duplicates)
        # What the trainer passes to `model(...)` so that its forward returns the terms used here.
        self.model_kwargs = {"return_stage1_terms": True}

    @classmethod
    def from_config(cls, config, temperature: float | None = None, **options) -> SPRCStage1Loss:
        """The loss for an `SPRCConfig` (what `trainers.losses.stage1_loss_for` calls). `temperature` is ignored:
        the trainer passes SPN's stage-2 tau (`config.temperature`), while SPRC's stage 1 learns its own (`temp`)."""
        return cls(temperature=None, **options)

    def _contrastive(self, queries: torch.Tensor, all_targets: torch.Tensor, labels: torch.Tensor,
                     same_image: torch.Tensor | None, temperature) -> torch.Tensor:
        scores = torch.einsum("bd,nqd->bnq", queries, all_targets.to(queries.dtype)).amax(dim=-1)
        logits = scores / temperature
        if same_image is not None:
            logits = logits.masked_fill(same_image, float("-inf"))
        return F.cross_entropy(logits, labels)

    def terms(self, outputs, target_keys: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The three unweighted terms `{"loss_itc", "loss_rtc", "loss_align"}` (the original's loss dict)."""
        missing = [name for name in ("query_embeds", "target_embeds", "prompt_text_embeds", "fusion_query_hidden",
                                     "prompt_tokens") if getattr(outputs, name, None) is None]
        if missing:
            raise ValueError(f"SPRCStage1Loss needs {missing} in the model output: call the model with "
                             f"{self.model_kwargs} and both reference and target images.")
        temperature = self.temperature if self.temperature is not None else outputs.temperature
        if temperature is None:
            raise ValueError("No temperature: the model output has none and SPRCStage1Loss(temperature=None).")
        query, target = outputs.query_embeds, outputs.target_embeds
        if target.ndim != 3:
            raise ValueError(f"SPRC targets are token sets [B, Q, D], got {tuple(target.shape)}.")
        rank, _ = world()
        all_targets, sizes = gather_with_grad(target)
        labels = torch.arange(query.shape[0], device=query.device) + sum(sizes[:rank])
        same_image = None
        if target_keys is not None and self.mask_duplicates:
            all_keys = gather_no_grad(target_keys.to(query.device), sizes)
            same_image = target_keys.to(query.device)[:, None] == all_keys[None, :]
            same_image[torch.arange(len(labels), device=labels.device), labels] = False
        prompt_mean = outputs.prompt_tokens.detach().mean(dim=1).expand(query.shape[0], -1)
        return {
            "loss_itc": self._contrastive(query, all_targets, labels, same_image, temperature),
            "loss_rtc": self._contrastive(outputs.prompt_text_embeds, all_targets, labels, same_image, temperature),
            "loss_align": F.mse_loss(outputs.fusion_query_hidden.mean(dim=1), prompt_mean.to(query.dtype)),
        }

    def forward(self, outputs, target_keys: torch.Tensor | None = None) -> torch.Tensor:
        terms = self.terms(outputs, target_keys)
        total = terms["loss_itc"] + self.rtc_weight * terms["loss_rtc"] + self.align_weight * terms["loss_align"]
        return total * ddp_mean_correction(len(outputs.query_embeds))  # this rank's share of the global mean

    def get_config_dict(self) -> dict:
        return {"temperature": self.temperature if self.temperature is not None else "learnable (model.temp)",
                "rtc_weight": self.rtc_weight, "align_weight": self.align_weight,
                "negatives": "global in-batch targets" + (", duplicates masked" if self.mask_duplicates else "")}

    @property
    def citation(self) -> str:
        return _SPRC_CITATION


__all__ = ["SPRCStage1Loss"]
