"""Tests of the U-Harmony layer against its equations, its numerical safety and its registration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Norm
from monai.networks.layers.utils import get_norm_layer

import uharmony_fed.norm as norm_mod
from uharmony_fed.norm import Harmonize, Restore, UHarmonyLayerNorm, UHarmonyNorm, register_norm


def _randomize(layer: UHarmonyNorm, seed: int = 0) -> None:
    """Give every coefficient a non-identity value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g) + (1.0 if p.ndim == 1 else 0.0))


def _reference(x: np.ndarray, layer: UHarmonyNorm) -> np.ndarray:
    """The layer's equations in float64 numpy, written independently of the module.

    Rows are the units that share one mean/std: (n, c) for channels-first, tokens for
    channels-last; columns are the elements of that unit.
    """
    a = layer.harmonize.coef.detach().double().numpy()
    clip, c_stat, eps = layer.harmonize.clip, layer.restore.stat_clip, layer.eps
    cl = layer.channels_last
    x = x.astype(np.float64)
    if cl:
        axes = (x.ndim - 1,)
    else:
        axes = tuple(range(2, x.ndim))
    mu = x.mean(axis=axes, keepdims=True)
    sigma = np.sqrt(x.var(axis=axes, keepdims=True) + eps)
    xh = (x - mu) / sigma
    u = np.clip(xh, -clip, clip)
    shape = (-1,) if cl else (-1,) + (1,) * (x.ndim - 2)

    def coef(arr: np.ndarray, k: int) -> np.ndarray:
        return arr[:, k].reshape(shape)

    z = coef(a, 0) + coef(a, 1) * xh
    for k in range(2, a.shape[1]):
        z = z + coef(a, k) * u**k
    form = layer.restore.form
    if form == "none":
        return z
    if form == "affine":
        w = layer.restore.weight.detach().double().numpy().reshape(shape)
        b = layer.restore.bias.detach().double().numpy().reshape(shape)
        return w * z + b
    g = layer.restore.g.detach().double().numpy()
    b = layer.restore.b.detach().double().numpy()
    s_t = c_stat * np.tanh(sigma / c_stat)
    m_t = c_stat * np.tanh(mu / c_stat)
    gamma = sum(coef(g, k) * s_t**k for k in range(g.shape[1]))
    beta = sum(coef(b, k) * m_t**k for k in range(b.shape[1]))
    return gamma * z + beta


def _input(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3.0 + 2.0
    x.view(-1)[::97] = 60.0  # a few bright voxels beyond the clip
    return x


@pytest.mark.parametrize(
    ("order", "restore_order", "restore"),
    [(1, 0, "poly"), (2, 1, "poly"), (3, 2, "poly"), (2, 1, "affine"), (3, 1, "none")],
)
def test_channels_first_matches_equations(order: int, restore_order: int, restore: str) -> None:
    layer = UHarmonyNorm(3, order=order, restore_order=restore_order, restore=restore, clip=4.0, stat_clip=5.0)
    _randomize(layer)
    x = _input((2, 3, 6, 5, 4))
    y = layer(x)
    ref = _reference(x.numpy(), layer)
    np.testing.assert_allclose(y.detach().double().numpy(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("order", [1, 3])
def test_channels_last_matches_equations(order: int) -> None:
    layer = UHarmonyLayerNorm(6, order=order, restore_order=2, clip=3.0, stat_clip=5.0)
    _randomize(layer, seed=3)
    x = _input((2, 3, 4, 2, 6))
    np.testing.assert_allclose(layer(x).detach().double().numpy(), _reference(x.numpy(), layer), rtol=1e-4, atol=1e-4)


def test_identity_init_is_instance_and_layer_norm() -> None:
    x = _input((2, 4, 5, 5, 5))
    torch.testing.assert_close(UHarmonyNorm(4)(x), F.instance_norm(x, eps=1e-5), rtol=1e-5, atol=1e-5)
    t = _input((2, 3, 3, 3, 8))
    torch.testing.assert_close(UHarmonyLayerNorm(8)(t), F.layer_norm(t, [8], eps=1e-5), rtol=1e-5, atol=1e-5)


def test_params_live_in_stage_modules() -> None:
    layer = UHarmonyNorm(4)
    for name, _ in layer.named_parameters():
        owner = layer.get_submodule(name.rpartition(".")[0])
        assert isinstance(owner, (Harmonize, Restore)), name
    assert list(UHarmonyNorm(4, restore="none").restore.parameters()) == []


@pytest.mark.parametrize("fill", [0.0, 7.5, 1e4])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("layer_cls", [UHarmonyNorm, UHarmonyLayerNorm])
def test_constant_input_is_finite(fill: float, autocast: bool, layer_cls: type[UHarmonyNorm]) -> None:
    layer = layer_cls(4, order=3, restore_order=2)
    _randomize(layer)
    x = torch.full((2, 4, 4, 4, 4), fill, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        inp = x.to(torch.bfloat16) if autocast else x
        y = layer(inp)
    assert y.dtype == inp.dtype
    assert torch.isfinite(y).all()
    y.float().square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_large_activations_stay_bounded_in_bf16() -> None:
    layer = UHarmonyNorm(2, order=3, restore_order=2)
    _randomize(layer)
    x = _input((1, 2, 6, 6, 6)) * 1e4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.to(torch.bfloat16))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("restore", ["poly", "affine"])
def test_gradients_reach_both_stages(restore: str) -> None:
    layer = UHarmonyNorm(3, order=2, restore_order=1, restore=restore)
    x = _input((2, 3, 4, 4, 4))
    target = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    F.mse_loss(layer(x), target).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_rejects_wrong_channels() -> None:
    with pytest.raises(ValueError, match="3 channels"):
        UHarmonyNorm(3)(torch.zeros(1, 4, 2, 2, 2))
    with pytest.raises(ValueError, match="form"):
        UHarmonyNorm(3, restore="spline")  # type: ignore[arg-type]


def test_monai_factory_builds_the_layer() -> None:
    layer = get_norm_layer(name=("UHARMONY_FED", {"order": 3}), spatial_dims=3, channels=5)
    assert isinstance(layer, UHarmonyNorm)
    assert layer.num_features == 5 and layer.harmonize.order == 3
    assert isinstance(get_norm_layer(name="uharmony_fed", spatial_dims=2, channels=2), UHarmonyNorm)


def test_registration_is_idempotent_and_never_overwrites() -> None:
    names = Norm.names
    register_norm()
    register_norm()
    assert Norm.names == names
    # A re-import creates a new factory function; the tagged old one is recognised as ours.
    current = Norm.components["UHARMONY_FED"]

    def stale(dim=None):  # noqa: ANN001, ANN202
        return torch.nn.Identity

    stale._uharmony_fed = True  # type: ignore[attr-defined]
    Norm.add("UHARMONY_FED", current.description, stale)
    try:
        register_norm()
        assert Norm.components["UHARMONY_FED"].value is norm_mod._uharmony_factory
    finally:
        Norm.components["UHARMONY_FED"] = current
    assert isinstance(get_norm_layer(name="UHARMONY_FED", spatial_dims=3, channels=2), UHarmonyNorm)
    with pytest.raises(ValueError, match="different layer"):
        register_norm("instance")
    Norm.add_factory_callable("UHF_TEST_OTHER", lambda dim=None: torch.nn.Identity)
    try:
        with pytest.raises(ValueError, match="UHF_TEST_OTHER"):
            register_norm("uhf_test_other")
    finally:
        del Norm.components["UHF_TEST_OTHER"]


def test_hand_written_backward_matches_autograd_in_float64():
    """The layer's two autograd Functions against numerical gradients (gradcheck)."""
    from uharmony_fed.norm import _Quadratic, _Standardize

    torch.manual_seed(0)
    x = (torch.randn(2, 3, 4, 5, dtype=torch.float64) * 2 + 1).requires_grad_()

    def standardize(x):
        xh, mu, sigma = _Standardize.apply(x, (2, 3), 1e-5)
        return xh * 1.3 + mu * 0.7 + sigma**2

    assert torch.autograd.gradcheck(standardize, (x,))
    xh = (torch.randn(2, 3, 4, 5, dtype=torch.float64) * 1.5).requires_grad_()
    a, b, d = (torch.randn(2, 3, 1, 1, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda *t: _Quadratic.apply(*t, 1.0), (xh, a, b, d))


def test_metatensor_input_trains_through_inplace_activations():
    """MONAI pipelines hand the network MetaTensors; DynUNet's activations work in place."""
    from monai.data import MetaTensor

    from uharmony_fed.model import ModelConfig, build_model

    model = build_model(ModelConfig(features=(4, 8, 16), head_channels=4))
    x = MetaTensor(torch.randn(2, 4, 16, 16, 16))
    model(x).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
