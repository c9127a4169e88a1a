"""Muon + AdamW in one optimiser: each rule does what its reference does."""

import copy
import math

import pytest
import torch

from parti_ops.model.optim import NS_COEFFICIENTS, NS_STEPS, MuonAdamW, orthogonalize


def _reference_orthogonalize(g: torch.Tensor) -> torch.Tensor:
    """One matrix at a time, as github.com/KellerJordan/Muon writes it (in float32 here)."""
    a, b, c = NS_COEFFICIENTS
    x = g.T if g.size(0) > g.size(1) else g
    x = x / x.norm().clamp_min(1e-7)
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.size(0) > g.size(1) else x


@pytest.mark.parametrize("shape", [(3, 8, 8), (2, 16, 4), (2, 4, 16)])
def test_orthogonalize_matches_the_reference_and_flattens_the_spectrum(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out = orthogonalize(g)
    for k in range(shape[0]):
        torch.testing.assert_close(out[k], _reference_orthogonalize(g[k]), atol=1e-5, rtol=1e-5)
    singular = torch.linalg.svdvals(out)
    assert singular.min() > 0.6 and singular.max() < 1.3  # the input's ranged far wider
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 2


def _pair(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    return model, copy.deepcopy(model)


def _groups(m: torch.nn.Module, **matrices: object) -> list[dict]:
    """The two matrices (with `matrices`' options) in one group, the vectors in another."""
    return [
        {"params": [m[0].weight, m[2].weight], **matrices},
        {"params": [m[0].bias, m[1].weight, m[1].bias, m[2].bias]},
    ]


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 5) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_adamw_groups_step_as_torch_adamw():
    model, twin = _pair()
    ours = MuonAdamW(_groups(model, weight_decay=0.1), lr=1e-2, betas=(0.9, 0.98))
    theirs = torch.optim.AdamW(
        _groups(twin, weight_decay=0.1), lr=1e-2, betas=(0.9, 0.98), weight_decay=0.0
    )
    _train(model, ours)
    _train(twin, theirs)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def test_muon_step_is_the_scaled_orthogonalised_nesterov_momentum():
    model, _ = _pair()
    weights = [model[0].weight, model[2].weight]
    start = [w.detach().clone() for w in weights]
    lr, momentum, decay = 1e-2, 0.95, 0.1
    group = {"params": weights, "muon": True, "weight_decay": decay, "lr_scale": 3.0}
    opt = MuonAdamW([group], lr=lr / 3)
    grads = [torch.randn_like(w) for w in weights]
    for w, g in zip(weights, grads, strict=True):
        w.grad = g.clone()
    opt.step()
    for w, w0, g in zip(weights, start, grads, strict=True):
        buf = (1 - momentum) * g  # the momentum after one step from zero
        update = _reference_orthogonalize(g + momentum * (buf - g))
        expected = w0 * (1 - lr * decay) - lr * 0.2 * math.sqrt(max(w.shape)) * update
        torch.testing.assert_close(w.detach(), expected, atol=1e-6, rtol=1e-5)


def test_state_round_trips_and_muon_refuses_vectors():
    model, twin = _pair()
    ours = MuonAdamW(_groups(model, muon=True), lr=1e-2)
    again = MuonAdamW(_groups(twin, muon=True), lr=1e-2)
    _train(model, ours, steps=3)
    twin.load_state_dict(model.state_dict())
    again.load_state_dict(copy.deepcopy(ours.state_dict()))  # as if read from a file
    _train(model, ours, steps=2)
    _train(twin, again, steps=2)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="matrices only"):
        MuonAdamW([{"params": [model[0].bias], "muon": True}], lr=1e-2)
