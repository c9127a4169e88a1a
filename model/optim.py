"""Muon for the Transformer's hidden matrices and AdamW for the rest, as one optimiser.

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) takes a matrix's
Nesterov momentum and replaces it by the nearest semi-orthogonal matrix, found with a
quintic Newton–Schulz iteration, so every direction of the update moves at the same rate.
Each update is scaled by 0.2·sqrt(max(rows, cols)) to give it the RMS of an AdamW update,
so that both kinds of parameters share one learning rate and schedule (Liu et al. 2025,
"Muon is Scalable for LLM Training", §2.2). Embeddings, the output head, norms and biases
stay with AdamW, as in both papers.

Matrices of one shape are orthogonalised as one batch: on a CPU `torch.optim.Muon`'s
loop over parameters in bfloat16 (which AVX2 cores emulate) cost a quarter of the tiny
preset's training throughput.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

# The quintic's coefficients and step count from the reference implementation
# (github.com/KellerJordan/Muon, muon.py): singular values land in about [0.7, 1.2].
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """About U·Vᵀ of each matrix in `g` (N, A, B), where U·S·Vᵀ is its SVD.

    bfloat16 on a GPU, as the reference does; float32 elsewhere.
    """
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16() if g.is_cuda else g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # iterate on the (small × small) Gram matrix of the shorter side
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-7)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.mT  # (N, A, A)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """One optimiser: groups with `muon=True` take Muon, the others AdamW.

    Args:
        params: parameter groups (dicts); a group's `muon` (default False) picks the rule,
            its `lr_scale` (default 1) multiplies `lr` for it, so that one schedule drives
            both, and its `weight_decay` (decoupled, as AdamW's) applies to either.
        lr: the shared learning rate.
        betas: AdamW's moment decays.
        momentum: Muon's Nesterov momentum.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "muon": False,
            "lr_scale": 1.0,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon takes matrices only: put other parameters in AdamW groups")

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """One update of every parameter that has a gradient."""
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon if group["muon"] else self._adamw)(group, params)

    def _muon(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, momentum = group["lr"] * group["lr_scale"], group["momentum"]
        by_shape: dict[torch.Size, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            by_shape[p.shape].append(p)
        for shape, same in by_shape.items():
            nesterov = []
            for p in same:
                state = self.state[p]
                if not state:
                    state["momentum"] = torch.zeros_like(p)
                state["momentum"].lerp_(p.grad, 1 - momentum)
                nesterov.append(p.grad.lerp(state["momentum"], momentum))
            updates = orthogonalize(torch.stack(nesterov))  # (N, *shape)
            scale = 0.2 * math.sqrt(max(shape))
            for p, update in zip(same, updates, strict=True):
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * scale)

    def _adamw(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        # torch.optim.AdamW's update (Loshchilov & Hutter 2019), written out so that both
        # rules live in one state dict; tests/model/test_optim.py checks it against torch's.
        lr, (beta1, beta2) = group["lr"] * group["lr_scale"], group["betas"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = float(state["step"])
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
            p.mul_(1 - lr * group["weight_decay"])
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))
