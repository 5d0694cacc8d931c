"""The U-Harmony normalization layer (harmonize, then restore) and its MONAI registration."""

from __future__ import annotations

from typing import Literal

import torch
from monai.networks.layers.factories import Norm
from torch import nn

RestoreForm = Literal["poly", "affine", "none"]
RESTORE_FORMS: tuple[str, ...] = ("poly", "affine", "none")
#: Name of the layer in MONAI's ``Norm`` factory (``norm_name=("UHARMONY_FED", {...})``).
NORM_NAME = "UHARMONY_FED"


def _per_channel(v: torch.Tensor, ndim: int, channels_last: bool) -> torch.Tensor:
    """View a per-channel vector (C,) so it broadcasts against an ``ndim`` tensor."""
    return v if channels_last else v.view(-1, *([1] * (ndim - 2)))


def _poly(coef: torch.Tensor, u: torch.Tensor, ndim: int, channels_last: bool) -> torch.Tensor:
    """Evaluate ``sum_k coef[:, k] * u**k`` per channel by Horner's rule."""
    out = _per_channel(coef[:, -1], ndim, channels_last)
    for k in range(coef.shape[1] - 2, -1, -1):
        out = out * u + _per_channel(coef[:, k], ndim, channels_last)
    return out


class _Standardize(torch.autograd.Function):
    """``x -> (xh, mu, sigma)`` over ``dims``, with the closed-form backward of instance norm.

    All three outputs are differentiable (restore uses ``mu`` and ``sigma``). With S voxels,
    ``dL/dx = (g_xh - mean(g_xh) - xh * mean(g_xh * xh)) / sigma + (g_mu + g_sigma * xh) / S``.
    Autograd through mean/sub/mul/sqrt gives the same numbers with several more passes
    over the volume, which made the layer cost several times InstanceNorm's.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, dims: tuple[int, ...], eps: float):  # type: ignore[override]
        mu = x.mean(dim=dims, keepdim=True)
        d = x - mu
        sigma = torch.sqrt((d * d).mean(dim=dims, keepdim=True) + eps)
        xh = d.div_(sigma)
        ctx.save_for_backward(xh, sigma)
        ctx.dims = dims
        return xh, mu, sigma

    @staticmethod
    def backward(ctx, g_xh, g_mu, g_sigma):  # type: ignore[override]
        xh, sigma = ctx.saved_tensors
        dims = ctx.dims
        count = xh.numel() // sigma.numel()
        if g_xh is None:
            g_xh = torch.zeros_like(xh)
        gx = g_xh - g_xh.mean(dim=dims, keepdim=True) - xh * (g_xh * xh).mean(dim=dims, keepdim=True)
        gx = gx / sigma
        if g_mu is not None:
            gx = gx + g_mu / count
        if g_sigma is not None:
            gx = gx + xh * (g_sigma / count)
        return gx, None, None


class _Quadratic(torch.autograd.Function):
    """``y = A * xh + B + D * clamp(xh, -c, c)**2``; A, B, D have the statistics' shape."""

    @staticmethod
    def forward(ctx, xh, A, B, D, clip: float):  # type: ignore[override]
        u = xh.clamp(-clip, clip)
        y = torch.addcmul(torch.addcmul(B, xh, A), u * u, D)
        ctx.save_for_backward(xh, A, D)
        ctx.clip = clip
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        xh, A, D = ctx.saved_tensors
        u = xh.clamp(-ctx.clip, ctx.clip)
        dims = tuple(i for i in range(g.ndim) if A.shape[i] == 1 and g.shape[i] != 1)

        def reduce(t: torch.Tensor) -> torch.Tensor:  # sum over the voxels A, B, D broadcast to
            return t.sum(dim=dims, keepdim=True) if dims else t

        gA, gB, gD = reduce(g * xh), reduce(g), reduce(g * u * u)
        inside = u * (u == xh)  # d(u**2)/dxh is 2u inside the clip and 0 where it clamps
        gxh = g * torch.addcmul(A, inside, D, value=2.0)
        return gxh, gA, gB, gD, None


class Harmonize(nn.Module):
    """Stage 1 (shared): a per-channel polynomial of the standardized input.

    ``z = a_0 + a_1 * xh + sum_{k>=2} a_k * clamp(xh, -clip, clip)**k``.

    The linear term sees ``xh`` unclamped, so at the identity init (``a_1 = 1``, others 0)
    the layer is exactly instance (or layer) normalization, also for the sparse bright
    voxels of a small lesion, whose standardized values can exceed any fixed clip. Only
    the powers ``k >= 2`` see the clamped input, which bounds them by ``|a_k| clip**k``
    in fp16/bf16 and keeps a large outlier from dominating the gradient of ``a_k``.

    Args:
        num_features: channels C.
        order: polynomial order K >= 1; ``coef`` has shape (C, K+1).
        clip: bound on the input of the powers ``k >= 2``.
    """

    def __init__(self, num_features: int, order: int = 2, clip: float = 6.0) -> None:
        super().__init__()
        if order < 1:
            msg = f"Harmonize order must be >= 1, found {order}"
            raise ValueError(msg)
        if clip <= 0:
            msg = f"Harmonize clip must be > 0, found {clip}"
            raise ValueError(msg)
        self.order = order
        self.clip = float(clip)
        coef = torch.zeros(num_features, order + 1)
        coef[:, 1] = 1.0
        self.coef = nn.Parameter(coef)

    def forward(self, xh: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """Apply the polynomial to standardized ``xh`` (channels at dim 1, or last)."""
        ndim = xh.ndim
        a = self.coef
        z = _per_channel(a[:, 0], ndim, channels_last) + _per_channel(a[:, 1], ndim, channels_last) * xh
        if self.order >= 2:
            u = xh.clamp(-self.clip, self.clip)
            z = z + _poly(a[:, 2:], u, ndim, channels_last) * u * u
        return z

    def extra_repr(self) -> str:
        return f"{self.coef.shape[0]}, order={self.order}, clip={self.clip}"


class Restore(nn.Module):
    """Stage 2 (site-specific): re-inject the instance statistics, ``y = gamma(sigma) z + beta(mu)``.

    Forms:
        ``"poly"``: ``gamma(s) = sum_k g_k s~^k``, ``beta(m) = sum_k b_k m~^k`` with
        ``g`` and ``b`` of shape (C, R+1), init ``g_0 = 1``, rest 0 (so ``y = z``).
        ``"affine"``: ``y = weight * z + bias`` (the usual norm affine, kept local; ablation).
        ``"none"``: ``y = z``, no parameters (stage 1 only).

    The statistics enter the polynomials soft-bounded, ``s~ = c * tanh(s / c)`` with
    ``c = stat_clip``: near-identity for ordinary activations, bounded for raw MRI
    intensities or exploding activations, so ``gamma`` and ``beta`` stay within
    ``sum_k |g_k| c**k`` and their gradients stay finite in low precision.

    Args:
        num_features: channels C.
        order: polynomial order R >= 0 of ``gamma`` and ``beta`` (``"poly"`` only).
        form: ``"poly"``, ``"affine"`` or ``"none"``.
        stat_clip: soft bound ``c`` on the statistics fed to the polynomials.
    """

    def __init__(
        self, num_features: int, order: int = 1, form: RestoreForm = "poly", stat_clip: float = 10.0
    ) -> None:
        super().__init__()
        if form not in RESTORE_FORMS:
            msg = f"Restore form must be one of {RESTORE_FORMS}, found {form!r}"
            raise ValueError(msg)
        if order < 0:
            msg = f"Restore order must be >= 0, found {order}"
            raise ValueError(msg)
        if stat_clip <= 0:
            msg = f"Restore stat_clip must be > 0, found {stat_clip}"
            raise ValueError(msg)
        self.form = form
        self.order = order
        self.stat_clip = float(stat_clip)
        if form == "poly":
            g = torch.zeros(num_features, order + 1)
            g[:, 0] = 1.0
            self.g = nn.Parameter(g)
            self.b = nn.Parameter(torch.zeros(num_features, order + 1))
        elif form == "affine":
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))

    def bound(self, s: torch.Tensor) -> torch.Tensor:
        """The soft-bounded statistic ``c * tanh(s / c)`` fed to the polynomials."""
        c = self.stat_clip
        return c * torch.tanh(s / c)

    def coefficients(
        self, mu: torch.Tensor, sigma: torch.Tensor, ndim: int, channels_last: bool = False
    ) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """``gamma`` and ``beta`` for these statistics, at the statistics' shape (or per channel)."""
        if self.form == "none":
            return 1.0, 0.0
        if self.form == "affine":
            return (_per_channel(self.weight, ndim, channels_last), _per_channel(self.bias, ndim, channels_last))
        return (_poly(self.g, self.bound(sigma), ndim, channels_last),
                _poly(self.b, self.bound(mu), ndim, channels_last))

    def forward(
        self, z: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, channels_last: bool = False
    ) -> torch.Tensor:
        """Restore ``z`` given per-instance statistics ``mu`` and ``sigma`` (broadcastable to ``z``)."""
        gamma, beta = self.coefficients(mu, sigma, z.ndim, channels_last)
        return gamma * z + beta

    def extra_repr(self) -> str:
        return f"form={self.form!r}, order={self.order}, stat_clip={self.stat_clip}"


class UHarmonyNorm(nn.Module):
    """U-Harmony normalization, a drop-in for ``InstanceNorm{1,2,3}d`` on (N, C, *spatial).

    Per instance and channel, ``mu`` and ``sigma = sqrt(var + eps)`` are taken over the
    spatial dims, ``xh = (x - mu) / sigma``, then ``z = harmonize(xh)`` and
    ``y = restore(z, mu, sigma)``. The statistics and both stages run in float32 with
    autocast disabled; the output has the input's dtype. A constant (or all-zero) input
    gives ``xh = 0`` and no NaN, since ``sigma >= sqrt(eps)``.

    Stage-1 parameters live only in ``self.harmonize`` (:class:`Harmonize`) and stage-2
    parameters only in ``self.restore`` (:class:`Restore`), so the sharing policy can
    decide by module type.

    Args:
        num_features: channels C (MONAI's ``get_norm_layer`` injects it).
        order: harmonize polynomial order K.
        restore_order: restore polynomial order R.
        restore: restore form, ``"poly"``, ``"affine"`` or ``"none"``.
        eps: variance floor.
        clip: harmonize clip for the powers ``k >= 2``.
        stat_clip: restore soft bound on the statistics.
    """

    #: Statistics over the spatial dims per channel (False) or over channels per token (True).
    channels_last: bool = False

    def __init__(
        self,
        num_features: int,
        order: int = 2,
        restore_order: int = 1,
        restore: RestoreForm = "poly",
        eps: float = 1e-5,
        clip: float = 6.0,
        stat_clip: float = 10.0,
    ) -> None:
        super().__init__()
        if num_features < 1:
            msg = f"num_features must be >= 1, found {num_features}"
            raise ValueError(msg)
        if eps <= 0:
            msg = f"eps must be > 0, found {eps}"
            raise ValueError(msg)
        self.num_features = num_features
        self.eps = float(eps)
        self.harmonize = Harmonize(num_features, order=order, clip=clip)
        self.restore = Restore(num_features, order=restore_order, form=restore, stat_clip=stat_clip)

    def _check(self, x: torch.Tensor) -> None:
        c = x.shape[-1] if self.channels_last else (x.shape[1] if x.ndim > 1 else -1)
        if x.ndim < 3 or c != self.num_features:
            where = "last" if self.channels_last else "1"
            msg = (
                f"{type(self).__name__}: expected a tensor of >= 3 dims with {self.num_features} "
                f"channels at dim {where}, found shape {tuple(x.shape)}"
            )
            raise ValueError(msg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize ``x``; returns a tensor of the same shape and dtype."""
        self._check(x)
        dims = (-1,) if self.channels_last else tuple(range(2, x.ndim))
        with torch.autocast(device_type=x.device.type, enabled=False):
            # Plain tensors through the custom Functions: a subclass such as MONAI's MetaTensor
            # re-wraps their outputs as views, which autograd forbids to modify in place.
            xf = (x if type(x) is torch.Tensor else x.as_subclass(torch.Tensor)).float()
            xh, mu, sigma = _Standardize.apply(xf, dims, self.eps)
            if self.harmonize.order <= 2:
                y = self._fused(xh, mu, sigma)
            else:
                y = self.restore(self.harmonize(xh, self.channels_last), mu, sigma, self.channels_last)
        return y.to(x.dtype)

    def _fused(self, xh: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The same equations for K <= 2, as one pass with per-channel factors folded first.

        ``y = gamma * (a0 + a1 * xh + a2 * clamp(xh)**2) + beta`` is
        ``A * xh + B + D * clamp(xh)**2`` with ``A = gamma a1``, ``B = gamma a0 + beta`` and
        ``D = gamma a2`` (per instance and channel; autograd handles these small tensors).
        """
        ndim, cl = xh.ndim, self.channels_last
        a = self.harmonize.coef
        gamma, beta = self.restore.coefficients(mu, sigma, ndim, cl)
        ones = torch.ones_like(mu)  # gives every factor the statistics' shape
        a2 = a[:, 2] if self.harmonize.order == 2 else torch.zeros_like(a[:, 0])
        A = gamma * _per_channel(a[:, 1], ndim, cl) * ones
        B = (gamma * _per_channel(a[:, 0], ndim, cl) + beta) * ones
        D = gamma * _per_channel(a2, ndim, cl) * ones
        return _Quadratic.apply(xh, A, B, D, self.harmonize.clip)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class UHarmonyLayerNorm(UHarmonyNorm):
    """U-Harmony in place of ``nn.LayerNorm(dim)`` for channels-last tokens (N, ..., C).

    Like LayerNorm, statistics are per token over its C channels (so a token's output
    does not depend on the crop it sits in); the harmonize and restore polynomials are
    per channel, and restore takes the token's own ``mu`` and ``sigma``. Configure with
    ``functools.partial(UHarmonyLayerNorm, order=3)`` where a class called as
    ``cls(dim)`` is expected (SwinUNETR's ``norm_layer``).
    """

    channels_last = True


def _uharmony_factory(dim: int | None = None) -> type[UHarmonyNorm]:
    """U-Harmony normalization (uharmony_fed): harmonize shared, restore site-specific."""
    return UHarmonyNorm  # one class for every spatial dim: statistics cover dims 2..


# Tags our factory so that a re-import (a new function object) is recognised as ours.
_uharmony_factory._uharmony_fed = True  # type: ignore[attr-defined]


def register_norm(name: str = NORM_NAME) -> None:
    """Register :class:`UHarmonyNorm` in MONAI's ``Norm`` factory under ``name``.

    Idempotent: registering again is a no-op; after a module reload the entry follows
    the reloaded class.

    Raises:
        ValueError: ``name`` is already taken by a different layer.
    """
    key = name.upper()
    existing = Norm.components.get(key)
    if existing is not None:
        if getattr(existing.value, "_uharmony_fed", False):
            # Ours (maybe from before a reload): point it at this module's class, quietly.
            Norm.add(key, existing.description, _uharmony_factory)
            return
        msg = f"MONAI Norm factory already holds a different layer under {key!r}: {existing.value!r}"
        raise ValueError(msg)
    Norm.add_factory_callable(key, _uharmony_factory)


register_norm()
