"""The original's optimizer maths inside the Trainer.

Every SPN4CIR `train.py` (and CLIP4Cir's stage 1) runs `torch.optim.AdamW` over every trainable parameter with one
weight decay (AdamW's default 0.01; 0.05 for SPRC), a constant learning rate and an AMP `GradScaler`, and never
clips the gradients. The Trainer's defaults differ in two places that the paper configs switch off: it leaves biases
and LayerNorm weights undecayed (`--decay_norms_and_biases` decays them) and clips the gradient norm at 1.0
(`--max_grad_norm 0` does not). The fused AdamW kernel (`--optim adamw_torch_fused`) is the same update in one
kernel per device; where the parameters' device has none, torch's default implementation runs it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def decay_parameter_names(model: torch.nn.Module) -> list[str]:
    """Every parameter name: the original's AdamW decays all of them."""
    return [name for name, _ in model.named_parameters()]


def fused_adamw_supported(parameters: Iterable[torch.nn.Parameter]) -> bool:
    """Whether torch has a fused AdamW kernel for every trainable parameter (its device type and a float dtype)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a torch that moved the list: fused on the accelerators every torch >= 2.4 has it for
        devices = {"cuda", "cpu", "mps", "xpu"}
    return all(p.device.type in devices and p.is_floating_point() for p in parameters if p.requires_grad)
