"""TG-CIR's own stage-1 objective (Wen et al., "Target-Guided Composed Image Retrieval", ACM MM 2023) as a loss
module, for `CIRTrainer(stage="in_batch")` with a TG-CIR model (`config.stage1_loss == "tgcir"`).

The formulas follow `VCG_CIR.compute_loss` of the original repository (iLearn-Lab/MM23-TG-CIR, `model.py`) and the
weighting of its `train.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import ddp_mean_correction, gather_no_grad, gather_with_grad, world

_TGCIR_CITATION = """@inproceedings{wen2023tgcir,
  title     = {Target-Guided Composed Image Retrieval},
  author    = {Wen, Haokun and Zhang, Xian and Song, Xuemeng and Wei, Yinwei and Nie, Liqiang},
  booktitle = {ACM Multimedia},
  year      = {2023}
}"""


def orthogonal_regularization(tokens: torch.Tensor) -> torch.Tensor:
    """`[B, T, D]` -> MSE between the tokens' cosine-similarity matrices and the identity (TG-CIR's `ortho`)."""
    normalized = F.normalize(tokens, dim=-1)
    cosine = normalized @ normalized.transpose(1, 2)
    eye = torch.eye(tokens.shape[1], device=tokens.device, dtype=cosine.dtype).expand_as(cosine)
    return F.mse_loss(cosine, eye)


class TGCIRStage1Loss(nn.Module):
    """
    TG-CIR's six-term stage-1 loss: a student (the retrieval model: query = remain-map fusion of reference and
    text tokens) and a target-guided teacher (`t_remain_map([reference, target])`, `t_replace_map([text,
    target])` on detached reference / text tokens), trained together:

        total = stu_rank + lambda_ * tea_rank + eta_ * tea_mask + mu_ * ortho + nu_ * ckd + kappa_ * kl

    - `stu_rank`: InfoNCE of the normalized student queries against the normalized pooled target tokens, logits
      scaled by the learnable `stage1_logit_scale` (the original's `loss_T`, initially 10);
    - `tea_rank`: the same on flattened teacher features: per-token normalized teacher-fused tokens (resp. target
      tokens) times the learnable `local_weight`, flattened `[B, (P + Q) * D]`;
    - `tea_mask`: MSE(teacher_remain + teacher_replace, 1);
    - `ortho`: mean over reference, target and text tokens of MSE(token cosine matrix, identity);
    - `ckd`: MSE(student remain, teacher remain) + MSE(1 - student remain, teacher replace), teacher detached;
    - `kl`: KL(softmax(tea . tea^T / t) || softmax(query . target^T / t)) with the (constant) teacher distribution
      computed on the flattened target features against themselves, as the original's
      `kl_div(query, target, tag_feature, tag_feature, t)`; `batchmean`.

    Defaults are the original's (`train.py` argparse / README): lambda_=1, eta_=1, mu_=0.1, nu_=10, kappa_=0.5,
    kl_temperature (`--tau_`)=0.1.

    Inputs: `forward(outputs, target_keys=None)`, `outputs` the [`TGCIROutput`] of
    `model(..., return_stage1_terms=True)` (the trainer passes `model_kwargs`) for a batch of references
    (`pixel_values`), texts and targets (`target_pixel_values`); `target_keys` `[B]` ids of the target images:
    a target repeated in the batch is masked out of the other queries' negatives in the two ranking terms (the
    original does not mask; with distinct targets nothing changes). Across processes the targets of the ranking
    and KL terms are gathered with autograd (the original trains on one GPU, where this is the identity).
    """

    def __init__(self, temperature: float | None = None, lambda_: float = 1.0, eta_: float = 1.0, mu_: float = 0.1,
                 nu_: float = 10.0, kappa_: float = 0.5, kl_temperature: float = 0.1, **options):
        super().__init__()
        if options:
            raise TypeError(f"TGCIRStage1Loss got unknown options {sorted(options)}.")
        self.temperature = temperature
        self.weights = {"stu_rank": 1.0, "tea_rank": lambda_, "tea_mask": eta_, "ortho": mu_, "ckd": nu_,
                        "kl": kappa_}
        self.kl_temperature = kl_temperature
        self.model_kwargs = {"return_stage1_terms": True}
        self.last_terms: dict[str, float] = {}

    @classmethod
    def from_config(cls, config, temperature: float | None = None, **options) -> TGCIRStage1Loss:
        """The loss the trainer builds for a TG-CIR model. `temperature` (SPN's stage-2 tau, which the trainer
        passes to every stage-1 loss) is NOT used: TG-CIR's stage 1 learns its own logit scale
        (`stage1_logit_scale`, the original's `loss_T`). Construct the class directly with `temperature=` to
        fix the scale to `1 / temperature` instead."""
        return cls(temperature=None, **options)

    def _scale(self, outputs) -> torch.Tensor | float:
        if self.temperature is not None:
            return 1.0 / self.temperature
        if outputs.stage1_logit_scale is None:
            raise ValueError("TGCIRStage1Loss needs model(..., return_stage1_terms=True) outputs.")
        return outputs.stage1_logit_scale

    @staticmethod
    def _ranking(query, targets, scale, labels, duplicate_mask):
        logits = query @ targets.T * scale
        if duplicate_mask is not None:
            logits = logits.masked_fill(duplicate_mask, float("-inf"))
        return F.cross_entropy(logits, labels)

    def compute_terms(self, outputs, target_keys: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The six unweighted terms (scalars), named as the original's `compute_loss` keys."""
        if outputs.teacher_fused_tokens is None:
            raise ValueError("TGCIRStage1Loss needs model(..., return_stage1_terms=True) outputs.")
        scale = self._scale(outputs)
        rank, _ = world()
        token_weight = outputs.local_weight[None, :, None]
        teacher_features = (F.normalize(outputs.teacher_fused_tokens, dim=-1) * token_weight).flatten(1)
        target_features = (F.normalize(outputs.target_tokens, dim=-1) * token_weight).flatten(1)

        all_targets, sizes = gather_with_grad(outputs.target_embeds)
        all_target_features, _ = gather_with_grad(target_features)
        labels = torch.arange(len(outputs.query_embeds), device=outputs.query_embeds.device) + sum(sizes[:rank])
        duplicates = None
        if target_keys is not None:
            all_keys = gather_no_grad(target_keys.to(labels.device), sizes)
            duplicates = target_keys.to(labels.device)[:, None] == all_keys[None, :]
            duplicates[torch.arange(len(labels), device=labels.device), labels] = False

        remain, t_remain, t_replace = outputs.remain_mask, outputs.teacher_remain_mask, outputs.teacher_replace_mask
        t = self.kl_temperature
        student = F.normalize(outputs.query_embeds, dim=-1) @ F.normalize(all_targets, dim=-1).T / t
        teacher = F.normalize(target_features, dim=-1) @ F.normalize(all_target_features, dim=-1).T / t
        return {
            "stu_rank": self._ranking(outputs.query_embeds, all_targets, scale, labels, duplicates),
            "tea_rank": self._ranking(teacher_features, all_target_features, scale, labels, duplicates),
            "tea_mask": F.mse_loss(t_remain + t_replace, torch.ones_like(t_remain)),
            "ortho": (orthogonal_regularization(outputs.reference_tokens)
                      + orthogonal_regularization(outputs.target_tokens)
                      + orthogonal_regularization(outputs.text_tokens)) / 3.0,
            "ckd": F.mse_loss(remain, t_remain.detach()) + F.mse_loss(1 - remain, t_replace.detach()),
            "kl": F.kl_div(F.log_softmax(student, dim=1), F.softmax(teacher.detach(), dim=1), reduction="batchmean"),
        }

    def forward(self, outputs, target_keys: torch.Tensor | None = None) -> torch.Tensor:
        terms = self.compute_terms(outputs, target_keys)
        self.last_terms = {name: float(value.detach()) for name, value in terms.items()}
        total = sum(self.weights[name] * value for name, value in terms.items())
        return total * ddp_mean_correction(len(outputs.query_embeds))  # this rank's share of the global mean

    def get_config_dict(self) -> dict:
        return {
            "objective": "TG-CIR stage 1 (student + target-guided teacher)",
            "logit_scale": "learnable (stage1_logit_scale)" if self.temperature is None else 1.0 / self.temperature,
            "weights": dict(self.weights),
            "kl_temperature": self.kl_temperature,
        }

    @property
    def citation(self) -> str:
        return _TGCIR_CITATION


__all__ = ["TGCIRStage1Loss", "orthogonal_regularization"]
