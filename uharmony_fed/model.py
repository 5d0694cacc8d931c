"""Model configuration, architecture registry, domain-gated head, parameter roles and loss."""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.nets import DynUNet, SwinUNETR
from torch import nn

from uharmony_fed import REGIONS
from uharmony_fed.norm import NORM_NAME, Harmonize, Restore, UHarmonyLayerNorm, UHarmonyNorm

#: Every state-dict tensor has exactly one of these roles (see :func:`param_roles`).
ROLES: tuple[str, ...] = ("backbone", "harmonize", "restore", "norm", "head", "adapter")

#: Module types whose own tensors have the role "norm" (plain normalization affines).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
)

#: Encoder stages of each architecture, for ``placement="first:N"``.
_ENCODER_STAGES = {"swinunetr": 5}


@dataclass(frozen=True)
class ModelConfig:
    """What network to build.

    Attributes:
        arch: registered architecture name.
        in_channels: input sequences (``len(MODALITIES)``).
        features: DynUNet filters per resolution stage (its depth is ``len(features)``).
        feature_size: SwinUNETR embedding size (a multiple of 12).
        swin_depths: SwinUNETR transformer blocks per stage (4 stages).
        head_channels: channels the backbone emits into the head.
        norm: ``"uharmony"`` or plain ``"instance"`` (and LayerNorm in Swin stages).
        order: harmonize polynomial order K.
        restore_order: restore polynomial order R.
        restore: restore form; ``"none"`` keeps stage 1 only.
        placement: which norms are U-Harmony: ``"all"``, ``"encoder"``, or ``"first:N"``
            (the first N encoder stages); the others are plain InstanceNorm/LayerNorm.
        prototypes: domain prototypes P of the head.
        input_adapter: ``"none"`` feeds the union of sequences (declared-missing ones as
            zero channels) straight to the backbone; ``"linear"`` puts a site-local 1x1x1
            convolution (identity at start) in front of it, so each site learns its own
            mixing of the sequences it has into the backbone's input.
    """

    arch: Literal["dynunet", "swinunetr"] = "dynunet"
    in_channels: int = 4
    features: tuple[int, ...] = (8, 16, 32, 64)
    feature_size: int = 12
    swin_depths: tuple[int, ...] = (1, 1, 1, 1)
    head_channels: int = 8
    norm: Literal["uharmony", "instance"] = "uharmony"
    order: int = 2
    restore_order: int = 1
    restore: Literal["poly", "affine", "none"] = "poly"
    placement: str = "all"
    prototypes: int = 2
    input_adapter: Literal["none", "linear"] = "none"

    def __post_init__(self) -> None:
        positive = {
            "in_channels": self.in_channels,
            "head_channels": self.head_channels,
            "prototypes": self.prototypes,
            "order": self.order,
        }
        for name, value in positive.items():
            if value < 1:
                msg = f"model.{name}: expected an integer >= 1, found {value}"
                raise ValueError(msg)
        if self.restore_order < 0:
            msg = f"model.restore_order: expected an integer >= 0, found {self.restore_order}"
            raise ValueError(msg)
        if len(self.features) < 2 or any(f < 1 for f in self.features):
            msg = f"model.features: expected >= 2 positive integers, found {self.features}"
            raise ValueError(msg)
        if self.feature_size < 12 or self.feature_size % 12:
            msg = f"model.feature_size: expected a multiple of 12 (SwinUNETR), found {self.feature_size}"
            raise ValueError(msg)
        if len(self.swin_depths) != 4 or any(d < 1 for d in self.swin_depths):
            msg = f"model.swin_depths: expected 4 integers >= 1, found {self.swin_depths}"
            raise ValueError(msg)
        n = self.encoder_stages_to_keep()
        if self.norm == "instance" and self.placement != "all":
            msg = f"model.placement: only 'all' applies to norm 'instance', found {self.placement!r}"
            raise ValueError(msg)
        stages = _ENCODER_STAGES.get(self.arch, len(self.features))
        if n is not None and not 1 <= n <= stages:
            msg = (
                f"model.placement: expected 'first:N' with 1 <= N <= {stages} for {self.arch}, "
                f"found {self.placement!r}"
            )
            raise ValueError(msg)

    def encoder_stages_to_keep(self) -> int | None:
        """Number of encoder stages whose norms are U-Harmony; ``None`` means all layers.

        Raises:
            ValueError: ``placement`` is not ``"all"``, ``"encoder"`` or ``"first:N"``.
        """
        p = self.placement
        if p == "all":
            return None
        if p == "encoder":
            return _ENCODER_STAGES.get(self.arch, len(self.features))
        head, _, tail = p.partition(":")
        if head == "first" and tail.isdigit():
            return int(tail)
        msg = f"model.placement: expected 'all', 'encoder' or 'first:N', found {p!r}"
        raise ValueError(msg)


# ---------------------------------------------------------------------------- registry

#: A builder returns the backbone and its encoder stages in order (each a list of modules).
ArchBuilder = Callable[[ModelConfig], tuple[nn.Module, list[list[nn.Module]]]]
ARCHS: dict[str, ArchBuilder] = {}


def register_arch(name: str) -> Callable[[ArchBuilder], ArchBuilder]:
    """Decorator registering an architecture builder under ``name``.

    Raises:
        ValueError: ``name`` is already registered.
    """

    def add(fn: ArchBuilder) -> ArchBuilder:
        if name in ARCHS:
            msg = f"architecture {name!r} is already registered ({ARCHS[name].__qualname__})"
            raise ValueError(msg)
        ARCHS[name] = fn
        return fn

    return add


def _norm_name(cfg: ModelConfig) -> tuple[str, dict]:
    """MONAI ``norm_name`` for conv blocks."""
    if cfg.norm == "instance":
        return ("instance", {"affine": True})
    return (NORM_NAME, {"order": cfg.order, "restore_order": cfg.restore_order, "restore": cfg.restore})


def _token_norm(cfg: ModelConfig) -> Callable[[int], nn.Module]:
    """Class-like ``norm_layer(dim)`` for transformer stages."""
    if cfg.norm == "instance":
        return nn.LayerNorm
    return functools.partial(
        UHarmonyLayerNorm, order=cfg.order, restore_order=cfg.restore_order, restore=cfg.restore
    )


@register_arch("dynunet")
def _build_dynunet(cfg: ModelConfig) -> tuple[nn.Module, list[list[nn.Module]]]:
    n = len(cfg.features)
    net = DynUNet(
        spatial_dims=3,
        in_channels=cfg.in_channels,
        out_channels=cfg.head_channels,
        kernel_size=[3] * n,
        strides=[1] + [2] * (n - 1),
        upsample_kernel_size=[2] * (n - 1),
        filters=list(cfg.features),
        norm_name=_norm_name(cfg),
        deep_supervision=False,
    )
    stages = [[net.input_block], *[[m] for m in net.downsamples], [net.bottleneck]]
    return net, stages


@register_arch("swinunetr")
def _build_swinunetr(cfg: ModelConfig) -> tuple[nn.Module, list[list[nn.Module]]]:
    # use_v2 blocks hard-code instance norm, so v1; patch_norm off (MONAI default).
    net = SwinUNETR(
        in_channels=cfg.in_channels,
        out_channels=cfg.head_channels,
        patch_size=2,
        depths=cfg.swin_depths,
        feature_size=cfg.feature_size,
        norm_name=_norm_name(cfg),
        norm_layer=_token_norm(cfg),  # type: ignore[arg-type]
        spatial_dims=3,
        use_v2=False,
    )
    vit = net.swinViT
    stages = [
        [net.encoder1],
        [net.encoder2, vit.layers1],
        [net.encoder3, vit.layers2],
        [net.encoder4, vit.layers3],
        [net.encoder10, vit.layers4],
    ]
    return net, stages


def _plain_norm(layer: UHarmonyNorm) -> nn.Module:
    """The standard layer U-Harmony stands in for."""
    if isinstance(layer, UHarmonyLayerNorm):
        return nn.LayerNorm(layer.num_features, eps=layer.eps)
    return nn.InstanceNorm3d(layer.num_features, eps=layer.eps, affine=True)


def _apply_placement(backbone: nn.Module, keep_roots: list[nn.Module]) -> None:
    """Replace every U-Harmony layer not under ``keep_roots`` with its plain counterpart."""
    keep = {id(m) for root in keep_roots for m in root.modules()}
    swaps = [
        (parent, name, child)
        for parent in backbone.modules()
        for name, child in parent.named_children()
        if isinstance(child, UHarmonyNorm) and id(child) not in keep
    ]
    # A parent shared by two paths (DynUNet's skip_layers) is swapped once for both.
    for parent, name, child in swaps:
        setattr(parent, name, _plain_norm(child))


# ---------------------------------------------------------------------------- head and net


class DomainGatedHead(nn.Module):
    """Site-local head: P prototype-gated 1x1x1 output layers, mixed by a soft gate.

    The global descriptor is the spatial mean of the features; the gate is
    ``softmax(cos(descriptor, prototypes) / temperature)`` over the P prototypes, so no
    domain id is needed at inference. Output ``p`` is ``W_p f + b_p``; the head returns
    ``sum_p gate_p (W_p f + b_p)``, computed by mixing the weights per sample first.

    Args:
        in_channels: feature channels C.
        out_channels: logits (``len(REGIONS)``).
        prototypes: P >= 1.
        temperature: softmax temperature of the gate.
    """

    def __init__(
        self, in_channels: int, out_channels: int = len(REGIONS), prototypes: int = 2, temperature: float = 0.1
    ) -> None:
        super().__init__()
        if prototypes < 1 or temperature <= 0:
            msg = (
                "DomainGatedHead: expected prototypes >= 1 and temperature > 0, "
                f"found {prototypes}, {temperature}"
            )
            raise ValueError(msg)
        self.temperature = float(temperature)
        self.prototypes = nn.Parameter(torch.randn(prototypes, in_channels))
        bound = 1.0 / math.sqrt(in_channels)  # nn.Conv3d's default init, one draw per prototype
        self.weight = nn.Parameter(torch.empty(prototypes, out_channels, in_channels).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(prototypes, out_channels).uniform_(-bound, bound))

    def gate(self, feats: torch.Tensor) -> torch.Tensor:
        """Gate weights (N, P) of features (N, C, *spatial)."""
        desc = feats.flatten(2).mean(-1)
        cos = F.cosine_similarity(desc[:, None, :], self.prototypes[None], dim=-1, eps=1e-6)
        return torch.softmax(cos / self.temperature, dim=-1)

    def forward(
        self, feats: torch.Tensor, return_gate: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, out, *spatial), and the gate (N, P) when ``return_gate``."""
        gate = self.gate(feats)
        w = torch.einsum("np,poc->noc", gate, self.weight)
        b = torch.einsum("np,po->no", gate, self.bias)
        logits = torch.einsum("noc,nc...->no...", w, feats) + b.view(*b.shape, *([1] * (feats.ndim - 2)))
        return (logits, gate) if return_gate else logits


class InputAdapter(nn.Module):
    """Site-local 1x1x1 convolution of the input sequences, the identity at start.

    A site's declared-missing channels are always zero, so their columns never train;
    the rows let the site rebuild what the shared backbone expects in those channels
    from the sequences it has, and recalibrate the ones it has.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UHarmonyNet(nn.Module):
    """A MONAI backbone followed by a :class:`DomainGatedHead`; one logit per region.

    Args:
        backbone: maps (N, in, *spatial) to (N, head_channels, *spatial).
        head: the site-local head.
        adapter: optional site-local :class:`InputAdapter` in front of the backbone.
    """

    def __init__(self, backbone: nn.Module, head: DomainGatedHead, adapter: InputAdapter | None = None) -> None:
        super().__init__()
        self.adapter = adapter
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, len(REGIONS) + extra, *spatial); one sigmoid per region (ET, TC, WT) and extra class."""
        if self.adapter is not None:
            x = self.adapter(x)
        return self.head(self.backbone(x))  # type: ignore[return-value]


def build_model(cfg: ModelConfig, extra_classes: int = 0) -> UHarmonyNet:
    """Build the network described by ``cfg``.

    Args:
        cfg: the network.
        extra_classes: outputs after the regions' for classes only this site annotates
            (``SiteConfig.extra_classes``); they live in the site-local head.

    Raises:
        ValueError: unknown ``cfg.arch`` (the valid names and a close match are given).
    """
    if cfg.arch not in ARCHS:
        near = difflib.get_close_matches(cfg.arch, list(ARCHS), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        msg = f"unknown architecture {cfg.arch!r}{hint} (valid: {', '.join(sorted(ARCHS))})"
        raise ValueError(msg)
    backbone, stages = ARCHS[cfg.arch](cfg)
    n = cfg.encoder_stages_to_keep()
    if cfg.norm == "uharmony" and n is not None:
        _apply_placement(backbone, [m for stage in stages[:n] for m in stage])
    head = DomainGatedHead(cfg.head_channels, len(REGIONS) + extra_classes, prototypes=cfg.prototypes)
    adapter = InputAdapter(cfg.in_channels) if cfg.input_adapter == "linear" else None
    return UHarmonyNet(backbone, head, adapter)


def param_roles(model: nn.Module) -> dict[str, str]:
    """Role of every state-dict key (parameters and buffers, aliases included).

    Decided by module type: tensors owned by a :class:`Harmonize` are "harmonize", by a
    :class:`Restore` "restore", anything under a :class:`DomainGatedHead` "head", under an
    :class:`InputAdapter` "adapter", owned by
    a plain normalization layer (``NORM_TYPES``) "norm", everything else "backbone".

    Args:
        model: any module.

    Returns:
        ``{state_dict_key: role}`` in state-dict order.
    """
    roles: dict[str, str] = {}
    for key in model.state_dict():
        path = key.rpartition(".")[0]
        owner = model.get_submodule(path)
        parts = path.split(".") if path else []
        ancestors = [model.get_submodule(".".join(parts[:i])) for i in range(len(parts) + 1)]
        if any(isinstance(m, DomainGatedHead) for m in ancestors):
            roles[key] = "head"
        elif any(isinstance(m, InputAdapter) for m in ancestors):
            roles[key] = "adapter"
        elif isinstance(owner, Harmonize):
            roles[key] = "harmonize"
        elif isinstance(owner, Restore):
            roles[key] = "restore"
        elif isinstance(owner, NORM_TYPES):
            roles[key] = "norm"
        else:
            roles[key] = "backbone"
    return roles


# ---------------------------------------------------------------------------- loss

_dice = DiceLoss(sigmoid=True, reduction="none")


def region_loss(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """Dice + BCE over the regions (and extra classes) each sample's site annotates.

    Args:
        logits: (N, R, *spatial) raw outputs, R = ``len(REGIONS)`` plus the site's extra classes.
        target: (N, R, *spatial) binary masks (float).
        annotated: (N, R) bool; False regions contribute nothing (and no gradient).

    Returns:
        Scalar mean of per-(sample, region) Dice + BCE over annotated pairs; zero (still
        differentiable) when nothing is annotated.

    Raises:
        ValueError: shapes disagree.
    """
    if logits.shape != target.shape or tuple(annotated.shape) != tuple(logits.shape[:2]):
        msg = (
            f"region_loss: expected logits and target of one shape and annotated (N, R), found "
            f"{tuple(logits.shape)}, {tuple(target.shape)}, {tuple(annotated.shape)}"
        )
        raise ValueError(msg)
    logits = logits.float()
    target = target.float()
    dice = _dice(logits, target).flatten(1)  # (N, R)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(2).mean(-1)
    mask = annotated.to(logits.dtype)
    # where() rather than a product: an unannotated pair gets an exact zero gradient.
    per = torch.where(annotated.bool(), dice + bce, torch.zeros_like(bce))
    return per.sum() / mask.sum().clamp_min(1.0)
