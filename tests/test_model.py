"""Tests of model building, placement, the domain-gated head, parameter roles and the region loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from uharmony_fed import REGIONS
from uharmony_fed.config import ConfigError, parse
from uharmony_fed.model import (
    ARCHS,
    ROLES,
    DomainGatedHead,
    ModelConfig,
    UHarmonyNet,
    build_model,
    param_roles,
    region_loss,
    register_arch,
)
from uharmony_fed.norm import Harmonize, Restore, UHarmonyLayerNorm, UHarmonyNorm

DYN = ModelConfig(arch="dynunet", features=(4, 8, 16), head_channels=4)
SWIN = ModelConfig(arch="swinunetr", feature_size=12, head_channels=4)
#: (config, training patch side, a volume side larger than the patch)
CASES = {"dynunet": (DYN, 16, 20), "swinunetr": (SWIN, 32, 36)}


def _count(module: nn.Module, cls: type[nn.Module]) -> int:
    return sum(isinstance(m, cls) for m in module.modules())


@pytest.mark.parametrize("arch", list(CASES))
def test_builds_trains_and_infers(arch: str) -> None:
    cfg, side, big = CASES[arch]
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, UHarmonyNet)
    assert _count(model.backbone, UHarmonyNorm) > 0
    assert _count(model.backbone, nn.modules.instancenorm._InstanceNorm) == 0
    if arch == "swinunetr":
        vit = model.backbone.swinViT
        assert _count(vit, UHarmonyLayerNorm) > 0 and _count(vit, nn.LayerNorm) == 0

    x = torch.randn(1, cfg.in_channels, side, side, side)
    target = (torch.rand(1, len(REGIONS), side, side, side) > 0.7).float()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    logits = model(x)
    assert logits.shape == (1, len(REGIONS), side, side, side)
    region_loss(logits, target, torch.ones(1, len(REGIONS), dtype=torch.bool)).backward()
    opt.step()
    roles = param_roles(model)
    changed = {roles[k] for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert {"backbone", "harmonize", "restore", "head"} <= changed

    model.eval()
    with torch.no_grad():
        out = sliding_window_inference(
            torch.randn(1, cfg.in_channels, big, big, side), (side,) * 3, sw_batch_size=1, predictor=model
        )
    assert out.shape == (1, len(REGIONS), big, big, side)
    assert torch.isfinite(out).all()


def test_instance_norm_variant_has_no_uharmony() -> None:
    model = build_model(dataclasses.replace(DYN, norm="instance"))
    assert _count(model, UHarmonyNorm) == 0
    assert "harmonize" not in param_roles(model).values()
    swin = build_model(dataclasses.replace(SWIN, norm="instance"))
    assert _count(swin, UHarmonyNorm) == 0 and _count(swin.backbone.swinViT, nn.LayerNorm) > 0


def test_placement_dynunet() -> None:
    net = build_model(dataclasses.replace(DYN, placement="encoder")).backbone
    encoder = [net.input_block, *net.downsamples, net.bottleneck]
    assert all(_count(m, UHarmonyNorm) > 0 and _count(m, nn.InstanceNorm3d) == 0 for m in encoder)
    assert all(_count(m, UHarmonyNorm) == 0 and _count(m, nn.InstanceNorm3d) > 0 for m in net.upsamples)

    net = build_model(dataclasses.replace(DYN, placement="first:1")).backbone
    assert _count(net.input_block, UHarmonyNorm) == _count(net, UHarmonyNorm) > 0
    # The skip_layers path sees the same (replaced) modules.
    assert _count(net.skip_layers, UHarmonyNorm) == _count(net.input_block, UHarmonyNorm)
    net(torch.randn(1, 4, 16, 16, 16))


def test_placement_swinunetr() -> None:
    net = build_model(dataclasses.replace(SWIN, placement="first:2")).backbone
    for kept in (net.encoder1, net.encoder2, net.swinViT.layers1):
        assert _count(kept, UHarmonyNorm) > 0
    assert _count(net.swinViT.layers2, UHarmonyNorm) == 0 and _count(net.swinViT.layers2, nn.LayerNorm) > 0
    assert _count(net.decoder1, UHarmonyNorm) == 0 and _count(net.decoder1, nn.InstanceNorm3d) > 0
    enc = build_model(dataclasses.replace(SWIN, placement="encoder")).backbone
    assert _count(enc.swinViT, UHarmonyLayerNorm) > 0 and _count(enc.decoder1, UHarmonyNorm) == 0


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"placement": "first:0"}, "first:N"),
        ({"placement": "first:9"}, "1 <= N <= 3"),
        ({"placement": "decoder"}, "'all', 'encoder' or 'first:N'"),
        ({"norm": "instance", "placement": "encoder"}, "only 'all'"),
        ({"features": (8,)}, ">= 2 positive"),
        ({"feature_size": 16}, "multiple of 12"),
        ({"prototypes": 0}, "prototypes"),
    ],
)
def test_config_rejects(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(DYN, **changes)


def test_config_parses_from_yaml_mapping() -> None:
    cfg = parse(ModelConfig, {"arch": "swinunetr", "features": [8, 16], "restore": "affine"}, "model")
    assert cfg.features == (8, 16) and cfg.restore == "affine"
    with pytest.raises(ConfigError, match="did you mean 'dynunet'"):
        parse(ModelConfig, {"arch": "dynunett"}, "model")


def test_arch_registry() -> None:
    assert {"dynunet", "swinunetr"} <= set(ARCHS)
    with pytest.raises(ValueError, match="already registered"):
        register_arch("dynunet")(lambda cfg: (nn.Identity(), []))
    with pytest.raises(ValueError, match="valid: dynunet, swinunetr"):
        build_model(dataclasses.replace(DYN, arch="unet"))  # type: ignore[arg-type]


def test_head_gate_and_mixture() -> None:
    torch.manual_seed(0)
    head = DomainGatedHead(5, 3, prototypes=3, temperature=0.5)
    feats = torch.randn(2, 5, 4, 4, 4)
    logits, gate = head(feats, return_gate=True)
    assert logits.shape == (2, 3, 4, 4, 4) and gate.shape == (2, 3)
    torch.testing.assert_close(gate.sum(-1), torch.ones(2))
    desc = feats.mean(dim=(2, 3, 4))
    cos = nn.functional.normalize(desc, dim=1) @ nn.functional.normalize(head.prototypes, dim=1).T
    torch.testing.assert_close(gate, torch.softmax(cos / 0.5, dim=-1))
    # The gate-weighted sum of P separate 1x1x1 convolutions.
    ref = sum(
        gate[:, p, None, None, None, None]
        * nn.functional.conv3d(feats, head.weight[p][..., None, None, None], head.bias[p])
        for p in range(3)
    )
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_head_with_one_prototype() -> None:
    head = DomainGatedHead(4, 3, prototypes=1)
    feats = torch.randn(1, 4, 3, 3, 3)
    logits, gate = head(feats, return_gate=True)
    torch.testing.assert_close(gate, torch.ones(1, 1))
    ref = nn.functional.conv3d(feats, head.weight[0][..., None, None, None], head.bias[0])
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_param_roles_by_module_type() -> None:
    for cfg in (dataclasses.replace(DYN, placement="first:1"), SWIN):
        model = build_model(cfg)
        roles = param_roles(model)
        assert list(roles) == list(model.state_dict())
        assert set(roles.values()) <= set(ROLES)
        for name, module in model.named_modules(remove_duplicate=False):
            own = [f"{name}.{k}" if name else k for k, _ in module.named_parameters(recurse=False)]
            expected = {Harmonize: "harmonize", Restore: "restore"}.get(type(module))
            if expected is None and isinstance(module, (nn.InstanceNorm3d, nn.LayerNorm)):
                expected = "norm"
            for key in own:
                if expected is not None:
                    assert roles[key] == expected, key
        assert all(roles[k] == "head" for k in model.state_dict() if k.startswith("head."))

    # Names do not matter: a conv called "norm" is backbone, a LayerNorm called "conv" is norm.
    toy = nn.Sequential()
    toy.add_module("norm", nn.Conv3d(1, 1, 1))
    toy.add_module("conv", nn.LayerNorm(2))
    assert param_roles(toy) == {
        "norm.weight": "backbone",
        "norm.bias": "backbone",
        "conv.weight": "norm",
        "conv.bias": "norm",
    }


def _loss_setup(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 6, 6, 6, generator=g, requires_grad=True)
    target = (torch.rand(2, 3, 6, 6, 6, generator=g) > 0.6).float()
    return logits, target


def test_region_loss_ignores_unannotated_regions() -> None:
    logits, target = _loss_setup()
    wt_only = torch.tensor([[False, False, True]] * 2)
    loss = region_loss(logits, target, wt_only)
    loss.backward()
    assert logits.grad[:, :2].abs().sum() == 0
    assert logits.grad[:, 2].abs().sum() > 0
    # Changing the unannotated targets changes nothing.
    other = target.clone()
    other[:, :2] = 1 - other[:, :2]
    torch.testing.assert_close(region_loss(logits, other, wt_only), loss)
    # It equals the loss of the WT channel alone.
    only = region_loss(logits[:, 2:], target[:, 2:], torch.ones(2, 1, dtype=torch.bool))
    torch.testing.assert_close(loss, only)


def test_region_loss_per_sample_and_empty() -> None:
    logits, target = _loss_setup(1)
    annotated = torch.tensor([[True, True, True], [False, False, True]])
    region_loss(logits, target, annotated).backward()
    assert logits.grad[0].abs().sum(dim=(1, 2, 3)).min() > 0
    assert logits.grad[1, :2].abs().sum() == 0
    logits.grad = None
    none = region_loss(logits, target, torch.zeros(2, 3, dtype=torch.bool))
    none.backward()
    assert none.item() == 0 and logits.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="annotated"):
        region_loss(logits, target, torch.ones(2, 2, dtype=torch.bool))


def test_input_adapter_starts_as_identity_and_is_site_local() -> None:
    """With the adapter on, the untrained network computes what it computes without it."""
    from uharmony_fed.model import InputAdapter, param_roles
    from uharmony_fed.policy import get_policy, split_keys

    cfg = ModelConfig(features=(4, 8, 16), head_channels=4)
    torch.manual_seed(0)
    plain = build_model(cfg)
    torch.manual_seed(0)
    adapted = build_model(dataclasses.replace(cfg, input_adapter="linear"))
    assert isinstance(adapted.adapter, InputAdapter)
    adapted.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(1, 4, 8, 8, 8)
    torch.testing.assert_close(adapted(x), plain(x), rtol=1e-5, atol=1e-5)
    adapter_keys = {k for k, r in param_roles(adapted).items() if r == "adapter"}
    assert adapter_keys == {"adapter.conv.weight", "adapter.conv.bias"}
    _, local = split_keys(adapted, get_policy("uharmony"))
    assert adapter_keys <= set(local)
