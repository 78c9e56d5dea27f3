"""SGD parameter groups with TransReID / DPM's rules (their solver/make_optimizer.py)."""

from __future__ import annotations

from typing import Iterable, Optional

import torch.nn as nn

from ._checks import check_real


def sgd_param_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    base_lr: float = 0.008,
    weight_decay: float = 1e-4,
    bias_lr_factor: float = 2.0,
    weight_decay_bias: Optional[float] = None,
) -> list[dict]:
    """Weights at ``base_lr``; biases at ``base_lr · bias_lr_factor``. Weight decay applies to every
    parameter (LayerNorm, BN, tokens and embeddings included), biases using ``weight_decay_bias``
    (default: the same value). Frozen parameters (e.g. the BNNeck bias) are left out."""
    # torch's SGD takes a NaN or negative lr and decay, and steps every weight to NaN or uphill
    check_real("sgd_param_groups", "base_lr", base_lr, 0, low_open=True)
    check_real("sgd_param_groups", "weight_decay", weight_decay, 0)
    check_real("sgd_param_groups", "bias_lr_factor", bias_lr_factor, 0)
    if weight_decay_bias is not None:
        check_real("sgd_param_groups", "weight_decay_bias", weight_decay_bias, 0)
    weights, biases = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            (biases if name.rsplit(".", 1)[-1] == "bias" else weights).append(param)
    bias_decay = weight_decay if weight_decay_bias is None else weight_decay_bias
    groups = [
        {"name": "weights", "params": weights, "lr": base_lr, "weight_decay": weight_decay},
        {"name": "biases", "params": biases, "lr": base_lr * bias_lr_factor, "weight_decay": bias_decay},
    ]
    return [group for group in groups if group["params"]]


def bnneck(dim: int) -> nn.BatchNorm1d:
    """BNNeck: BatchNorm1d with weight 1, bias 0 and the bias frozen."""
    neck = nn.BatchNorm1d(dim)
    neck.bias.requires_grad_(False)
    return neck
