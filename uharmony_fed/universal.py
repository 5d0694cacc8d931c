"""Opt-in site exports and the universal model: every exporting site's restore and head behind a domain gate.

A site that agrees runs ``uharmony-fed export``: it writes its restore and head tensors
(the parameters whose role is "restore" or "head"; a few kilobytes, no voxels, no file
names, no case ids) and a *domain descriptor*, summary statistics of how its scanner's
images look to the network's first normalization layer. ``uharmony-fed assemble``
puts the federation's shared arrays and every export into one file, and
:class:`UniversalModel` segments an image from any site, with no site id: a gate
compares the image's own statistics with each site's descriptor and mixes the sites'
personalized logits accordingly.

Why these statistics. U-Harmony's restore stage re-injects the per-instance, per-channel
mean and spread of the features, because they carry the scanner and protocol (contrast
curve, noise, bias field, missing sequences) after harmonization has removed them. The
first normalization layer of the network is the one place where those statistics are
both strongly scanner-dependent and comparable across sites: its input depends only on
the layers before it, which are backbone weights shared by every site, not on any site's
restore or head. (Deeper layers see features already restored by some site's own
parameters, so their statistics would depend on which site's model computed them.) The
descriptor of an image is therefore ``f = [mu_c, log sigma_c]`` over the C channels of
the first normalization layer's input on the whole preprocessed volume, taken over the
head's voxels (the background's share depends on the crop, not the scanner); a site's
descriptor is the mean and variance of ``f`` over its training cases (statistics of
statistics: nothing about an individual image leaves). The gate is a diagonal-Gaussian
classifier: ``d_s = mean_j [(f_j - m_sj)^2 / v_sj + log v_sj]``, ``gate = softmax(-d_s /
T)``, where ``v_s`` is the site's variance shrunk toward the pooled one (few training
cases would otherwise give near-zero variances and an overconfident gate). With
``T = 2 / D`` it is the Bayes posterior over sites under equal priors; the default
``T = 1`` is softer, so an image between two scanners gets a mix. One forward per site
with a noticeable weight (``> min_weight``), which is cheap enough on a CPU.

Unseen scanners. The softmax names the nearest site even for an image far from every
site, and the nearest scanner need not be the site whose restoration fits best. So each
site has a *radius*: a distance (in ``m_s = mean_j (f_j - m_sj)^2 / v_sj``, the distance
without its ``log v`` term) beyond which at most 1 % of its own unseen cases would lie,
by a distribution-free bound (few cases per site make the tails heavy).
A case ``k = min_s m_s / r_s > 1`` times farther than that from every site is outside
the federation, and its gate is flattened toward uniform mixing:
``gate = softmax / k^2 + (1 - 1 / k^2) / S``. Inside some site's radius the gate is the
plain softmax.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from uharmony_fed import REGIONS
from uharmony_fed.checkpoint import load_payload, save_payload
from uharmony_fed.config import parse, to_dict
from uharmony_fed.data import DataConfig
from uharmony_fed.model import NORM_TYPES, ModelConfig, UHarmonyNet, build_model, param_roles
from uharmony_fed.norm import UHarmonyNorm
from uharmony_fed.policy import SharingPolicy, canonical_state, get_policy, load_shared

log = logging.getLogger(__name__)

EXPORT_KIND = "uharmony_fed.site_export"
UNIVERSAL_KIND = "uharmony_fed.universal_model"
FORMAT_VERSION = 1
#: The roles a site exports: exactly its personalization.
EXPORT_ROLES: tuple[str, ...] = ("restore", "head", "adapter")
#: Pseudo-count of the pooled variance in each site's shrunk variance.
DEFAULT_SHRINKAGE = 2.0
DEFAULT_TEMPERATURE = 1.0
#: At most this share of a site's own unseen cases may lie beyond its fallback radius.
DEFAULT_OUTLIER_RATE = 0.01
_LOG_EPS = 1e-6


# ----------------------------------------------------------------------------- parts


def export_keys(model: nn.Module) -> list[str]:
    """The de-aliased state-dict keys whose role is one of :data:`EXPORT_ROLES`."""
    roles = param_roles(model)
    return [k for k in canonical_state(model) if roles[k] in EXPORT_ROLES]


def check_policy(policy: SharingPolicy) -> None:
    """A universal model needs every site-specific tensor to be restore or head.

    Raises:
        ValueError: the policy keeps other roles local (their values differ per site
            and would not be exported), or is not federated.
    """
    extra = sorted(set(policy.local_roles) - set(EXPORT_ROLES))
    if extra or not policy.federated:
        msg = (f"policy {policy.name!r} keeps {extra or 'everything'} at each site; a universal model "
               f"needs a federation whose site-specific part is only {list(EXPORT_ROLES)} "
               "(policy 'uharmony' or 'fedper')")
        raise ValueError(msg)


def shared_digest(arrays: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the shared arrays (keys, shapes, float32 values): names the final model."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        t = torch.as_tensor(arrays[key]).detach().cpu().float().contiguous()
        h.update(key.encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class _Stop(Exception):
    """Raised by the statistics hook: nothing after the first norm needs computing."""


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (UHarmonyNorm, *NORM_TYPES))


def _channels_last(m: nn.Module) -> bool:
    return bool(getattr(m, "channels_last", False)) or isinstance(m, nn.LayerNorm)


def _foreground(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """``(N, 1, V)`` float mask of the voxels where any input channel is non-zero, at ``size``.

    Falls back to every voxel for an image without foreground or a layer whose grid
    cannot be matched to the input's.
    """
    fg = (x.detach().abs().sum(1, keepdim=True) > 0).float()
    if tuple(fg.shape[2:]) != tuple(size):
        if len(size) != fg.ndim - 2:
            return torch.ones(x.shape[0], 1, int(torch.Size(size).numel()), device=x.device)
        fg = (F.adaptive_max_pool3d(fg, tuple(size)) if fg.ndim == 5 else
              F.interpolate(fg, size=tuple(size), mode="nearest"))
    fg = fg.flatten(2)
    empty = fg.sum(-1, keepdim=True) == 0
    return torch.where(empty, torch.ones_like(fg), fg)


@torch.no_grad()
def first_norm_statistics(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-image ``[mu_c, log sigma_c]`` of the input of the first normalization layer called.

    The statistics are taken over the head (the voxels where any input sequence is
    non-zero): the zero background outside a skull-stripped head has a share set by the
    crop and the head's size, not by the scanner, and would blur the domain signal.
    Only the layers up to that norm run (a hook stops the forward there), so this costs
    about one convolution even on a full-resolution volume.

    Args:
        net: the network (any U-Harmony or plain-norm model of :func:`build_model`).
        x: ``(N, in_channels, *spatial)`` preprocessed images.

    Returns:
        ``(N, 2 C)`` float32 on ``x``'s device.

    Raises:
        ValueError: the network has no normalization layer, or calls none.
    """
    found: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        h = args[0].float()
        if _channels_last(module):
            h = h.movedim(-1, 1)
        mask = _foreground(x, h.shape[2:])
        n = mask.sum(-1, keepdim=True)
        flat = h.flatten(2)
        mu = (flat * mask).sum(-1) / n[..., 0]
        var = (((flat - mu[..., None]) ** 2) * mask).sum(-1) / n[..., 0]
        found.append(torch.cat([mu, torch.log(var.sqrt() + _LOG_EPS)], dim=1))
        raise _Stop

    # The shared backbone only: a site-local input adapter in front of it would make the
    # statistics depend on whose parameters are loaded.
    body = net.backbone if isinstance(net, UHarmonyNet) else net
    norms = [m for m in body.modules() if _is_norm(m)]
    if not norms:
        msg = f"{type(net).__name__} has no normalization layer to take domain statistics from"
        raise ValueError(msg)
    handles = [m.register_forward_pre_hook(hook) for m in norms]
    was_training = net.training
    net.eval()
    try:
        body(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    if not found:
        msg = f"{type(net).__name__}: the forward called no normalization layer"
        raise ValueError(msg)
    return found[0]


@dataclass(frozen=True)
class DomainDescriptor:
    """A site's domain: mean and variance of :func:`first_norm_statistics` over its cases.

    Attributes:
        mean: ``(D,)``.
        var: ``(D,)``, the population variance (zero for a single case).
        count: number of cases summarized.
    """

    mean: torch.Tensor
    var: torch.Tensor
    count: int

    def __post_init__(self) -> None:
        if self.mean.ndim != 1 or self.mean.shape != self.var.shape or self.count < 1:
            msg = (f"DomainDescriptor: expected mean and var of one shape (D,) and count >= 1, found "
                   f"{tuple(self.mean.shape)}, {tuple(self.var.shape)}, {self.count}")
            raise ValueError(msg)

    @classmethod
    def from_features(cls, feats: torch.Tensor) -> DomainDescriptor:
        """Summarize ``(n, D)`` per-image features."""
        feats = feats.detach().float().cpu()
        var, mean = torch.var_mean(feats, dim=0, unbiased=False)
        return cls(mean, var, int(feats.shape[0]))

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.clone(), "var": self.var.clone(), "count": self.count}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DomainDescriptor:
        return cls(torch.as_tensor(d["mean"]).float(), torch.as_tensor(d["var"]).float(), int(d["count"]))


def site_descriptor(net: nn.Module, images: Sequence[torch.Tensor],
                    device: str | torch.device = "cpu") -> DomainDescriptor:
    """The :class:`DomainDescriptor` of preprocessed whole volumes ``(in_channels, *spatial)``."""
    if not images:
        raise ValueError("site_descriptor: no image to summarize")
    net = net.to(device)
    feats = [first_norm_statistics(net, torch.as_tensor(img).float()[None].to(device))[0].cpu() for img in images]
    return DomainDescriptor.from_features(torch.stack(feats))


def shrunk_variances(descriptors: Sequence[DomainDescriptor], shrinkage: float = DEFAULT_SHRINKAGE) -> torch.Tensor:
    """Each site's variance shrunk toward the pooled within-site variance, ``(S, D)``.

    ``v_s = (n_s var_s + k pooled) / (n_s + k)``; the pooled variance is floored at a
    small share of the spread of the site means, so identical cases do not give an
    infinitely sharp gate.
    """
    means = torch.stack([d.mean for d in descriptors])
    var = torch.stack([d.var for d in descriptors])
    n = torch.tensor([float(d.count) for d in descriptors])[:, None]
    pooled = (n * var).sum(0) / n.sum()
    between = means.var(0, unbiased=False) if len(descriptors) > 1 else torch.zeros_like(pooled)
    pooled = torch.maximum(pooled, 0.01 * between).clamp_min(1e-6)
    return (n * var + shrinkage * pooled) / (n + shrinkage)


def gate_mahalanobis(feats: torch.Tensor, means: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """``m_s = mean_j (f_j - m_sj)^2 / v_sj`` for features ``(N, D)``; returns ``(N, S)``."""
    diff = feats[:, None, :] - means[None]
    return ((diff * diff) / variances[None]).mean(-1)


def gate_distances(feats: torch.Tensor, means: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """``d_s = mean_j [(f_j - m_sj)^2 / v_sj + log v_sj]`` for features ``(N, D)``; returns ``(N, S)``."""
    return gate_mahalanobis(feats, means, variances) + torch.log(variances).mean(-1)[None]


def fallback_radii(descriptors: Sequence[DomainDescriptor], variances: torch.Tensor,
                   outlier_rate: float = DEFAULT_OUTLIER_RATE) -> torch.Tensor:
    """Per site, how far (:func:`gate_mahalanobis`) its own unseen cases lie, but for ``outlier_rate``; ``(S,)``.

    The site's own training cases lie at ``c_s = mean_j var_sj / v_sj`` on average (exact,
    from the descriptor); a case not among them also carries the error of the site's
    mean, a factor ``1 + 1 / n_s``: mean ``mu = (1 + 1 / n_s) max(1, c_s)`` (``max(1, .)``
    keeps a site of one case, zero spread, from calling every case foreign). Its standard
    deviation is at most ``sqrt(2) mu`` (a chi-square of one degree of freedom: the ``D``
    statistics of an image move together, so no averaging over them is assumed).
    Cantelli's inequality, which assumes no distribution, puts at most ``outlier_rate``
    beyond ``mu + z sqrt(2) mu`` with ``z = sqrt(1 / outlier_rate - 1)``.
    """
    var = torch.stack([d.var for d in descriptors])
    n = torch.tensor([float(d.count) for d in descriptors])
    mu = (1.0 + 1.0 / n) * (var / variances).mean(-1).clamp_min(1.0)
    z = (1.0 / outlier_rate - 1.0) ** 0.5
    return mu * (1.0 + z * 2.0 ** 0.5)


def gate_weights(distances: torch.Tensor, mahalanobis: torch.Tensor, radii: torch.Tensor | None,
                 temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """Site weights ``(N, S)``: ``softmax(-d / T)``, flattened toward uniform outside every radius.

    With ``k = min_s m_s / r_s``, a case inside some site's radius (``k <= 1``) keeps the
    softmax; one farther out gets ``softmax / k^2 + (1 - 1 / k^2) / S``, so the nearest
    site counts less the farther the case is from all of them. ``radii=None``: the plain softmax.
    """
    sharp = torch.softmax(-distances / temperature, dim=-1)
    if radii is None:
        return sharp
    keep = (mahalanobis / radii[None]).min(-1, keepdim=True).values.clamp_min(1.0) ** -2
    return keep * sharp + (1.0 - keep) / distances.shape[-1]


# ----------------------------------------------------------------------------- export


def _site_training_images(site: Any, data_cfg: DataConfig, seed: int) -> list[torch.Tensor]:
    """The site's usable training cases, preprocessed as for prediction (whole volumes)."""
    from uharmony_fed.data import discover_cases, load_case_for_inference, split_cases, usable_cases

    train, _ = split_cases(discover_cases(site), site.val_fraction, seed)
    train, skipped = usable_cases(train, site, data_cfg)
    if skipped:
        log.warning("site %s: %d problem(s) in training cases; those cases are left out of the descriptor",
                    site.name, len(skipped))
    if not train:
        msg = f"site {site.name}: no usable training case in {site.data_dir}; run check-data"
        raise ValueError(msg)
    return [load_case_for_inference(c, site, data_cfg).image.as_tensor() for c in train]


def export_site(model: str | Path, site_config: str | Path, out: str | Path, *, device: str = "cpu") -> Path:
    """``uharmony-fed export``: write a site's restore and head tensors and its domain descriptor.

    The site's model is the run's shared arrays plus the site's own local state
    (``<state_dir>/<federation>/local_state.ckpt``); the descriptor is computed with that
    model on the site's own training cases. The file holds tensors, counts, the site's
    name, the federation's name and policy and a digest of the shared arrays; no voxel,
    file name or case id.

    Args:
        model: the finished run folder (or its ``final_shared.ckpt``).
        site_config: the site's site.yaml.
        out: the export file to write (parents created).
        device: where to compute the descriptor.

    Returns:
        ``out``.

    Raises:
        FileNotFoundError: no final model, or the site has no local state for it.
        ValueError: the federation's policy keeps more than restore and head local.
    """
    from uharmony_fed.data import load_site_config
    from uharmony_fed.predict import RUN_CONFIG, load_site_model

    site = load_site_config(site_config)
    sm = load_site_model(model, site, device)
    check_policy(get_policy(sm.policy))
    payload = load_payload(sm.checkpoint)
    canon = canonical_state(sm.model)
    params = {k: canon[k].detach().cpu().clone() for k in export_keys(sm.model)}
    data_cfg = sm.data or DataConfig()
    seed = 0
    if (sm.checkpoint.parent / RUN_CONFIG).is_file():
        from uharmony_fed.fedconfig import load_config

        seed = load_config(sm.checkpoint.parent / RUN_CONFIG).seed
    images = _site_training_images(site, data_cfg, seed)
    desc = site_descriptor(sm.model, images, sm.device)
    doc = {
        "kind": EXPORT_KIND,
        "version": FORMAT_VERSION,
        "site": site.name,
        "federation": sm.federation,
        "policy": sm.policy,
        "shared_digest": shared_digest(payload["arrays"]),
        "params": params,
        "descriptor": desc.to_dict(),
    }
    out = Path(out)
    save_payload(out, doc)
    return out


def load_export(path: str | Path) -> dict[str, Any]:
    """Read and check one export file.

    Raises:
        ValueError: not an export of this format.
    """
    doc = load_payload(Path(path))
    if doc.get("kind") != EXPORT_KIND or doc.get("version") != FORMAT_VERSION:
        msg = (f"{path}: not a uharmony-fed site export (kind {doc.get('kind')!r}, version "
               f"{doc.get('version')!r}; expected {EXPORT_KIND!r} v{FORMAT_VERSION}); make it with "
               "'uharmony-fed export'")
        raise ValueError(msg)
    return doc


# ----------------------------------------------------------------------------- assemble


def assemble(model: str | Path, exports: Sequence[str | Path], out: str | Path, *,
             temperature: float = DEFAULT_TEMPERATURE, shrinkage: float = DEFAULT_SHRINKAGE) -> Path:
    """``uharmony-fed assemble``: one universal-model file from a run and the sites' exports.

    Every export must come from this run (same federation name and shared-array digest)
    and hold exactly the model's restore and head keys with matching shapes. The gate's
    settings and each site's fallback radius (:func:`fallback_radii`) go into the file.

    Args:
        model: the finished run folder (or its ``final_shared.ckpt``).
        exports: one export file per site (at least one; no site twice).
        out: the universal file to write.
        temperature: gate temperature ``T`` (smaller is sharper).
        shrinkage: pseudo-count of the pooled variance in each site's variance.

    Returns:
        ``out``.

    Raises:
        ValueError: an export that does not fit the run (the file is named), or bad arguments.
    """
    from uharmony_fed.predict import RUN_CONFIG, _run_settings, resolve_checkpoint

    if not exports:
        raise ValueError("assemble: pass at least one export file (--exports)")
    if temperature <= 0 or shrinkage < 0:
        msg = f"assemble: expected temperature > 0 and shrinkage >= 0, found {temperature}, {shrinkage}"
        raise ValueError(msg)
    ckpt = resolve_checkpoint(model)
    run = load_payload(ckpt)
    absent = [k for k in ("arrays", "policy", "model", "name") if k not in run]
    if absent:
        msg = f"{ckpt}: not a final federated model (no {', '.join(absent)})"
        raise ValueError(msg)
    policy = get_policy(str(run["policy"]))
    check_policy(policy)
    net = build_model(parse(ModelConfig, run["model"], f"{ckpt}: model"))
    load_shared(net, run["arrays"], policy)
    keys = export_keys(net)
    canon = canonical_state(net)
    digest = shared_digest(run["arrays"])
    sites: list[dict[str, Any]] = []
    dims: int | None = None
    for path in exports:
        doc = load_export(path)
        if doc["federation"] != run["name"] or doc["shared_digest"] != digest:
            msg = (f"{path}: exported from federation {doc['federation']!r} with other shared arrays; "
                   f"export again from the run in {ckpt.parent}")
            raise ValueError(msg)
        params = doc["params"]
        missing, extra = sorted(set(keys) - set(params)), sorted(set(params) - set(keys))
        bad = [k for k in keys if k in params and tuple(params[k].shape) != tuple(canon[k].shape)]
        if missing or extra or bad:
            msg = (f"{path}: its tensors do not fit the model (missing {missing[:3]}, unexpected "
                   f"{extra[:3]}, wrong shape {bad[:3]})")
            raise ValueError(msg)
        desc = DomainDescriptor.from_dict(doc["descriptor"])
        if dims is not None and desc.mean.numel() != dims:
            msg = f"{path}: descriptor of {desc.mean.numel()} values, the others have {dims}"
            raise ValueError(msg)
        dims = desc.mean.numel()
        if any(s["site"] == doc["site"] for s in sites):
            msg = f"{path}: site {doc['site']!r} is exported twice; pass one export per site"
            raise ValueError(msg)
        sites.append({"site": str(doc["site"]), "params": params, "descriptor": desc.to_dict()})
    descs = [DomainDescriptor.from_dict(s["descriptor"]) for s in sites]
    radii = fallback_radii(descs, shrunk_variances(descs, shrinkage))
    data, sw_batch_size, overlap = _run_settings(ckpt.parent / RUN_CONFIG)
    doc = {
        "kind": UNIVERSAL_KIND,
        "version": FORMAT_VERSION,
        "federation": str(run["name"]),
        "policy": policy.name,
        "model": run["model"],
        "arrays": run["arrays"],
        "sites": sites,
        "gate": {"temperature": float(temperature), "shrinkage": float(shrinkage), "radii": radii.tolist()},
        "data": None if data is None else to_dict(data),
        "sw_batch_size": sw_batch_size,
        "overlap": overlap,
    }
    out = Path(out)
    save_payload(out, doc)
    return out


# ----------------------------------------------------------------------------- the model


class _SiteParams(nn.Module):
    """One site's restore and head tensors as buffers (so ``.to()`` moves them)."""

    def __init__(self, params: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.keys = list(params)
        for i, k in enumerate(self.keys):
            self.register_buffer(f"t{i}", torch.as_tensor(params[k]).detach().float().clone())

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, f"t{i}") for i, k in enumerate(self.keys)}


class UniversalModel(nn.Module):
    """The federation's shared network with every exporting site's restore and head, behind a domain gate.

    ``forward(x)`` returns ``sum_s gate_s(x) * logits_s(x)``, where ``logits_s`` is the
    network with site ``s``'s restore and head, and the gate comes from ``x``'s own
    first-layer statistics (see the module docstring); no site id is read. For a
    sliding window, compute the gate once on the whole volume and pass it as ``gate``.

    Args:
        model_cfg: the network.
        shared: the federation's shared arrays.
        sites: per site ``{"site": name, "params": {key: tensor}, "descriptor": {...}}``.
        policy: the federation's sharing policy.
        temperature: gate temperature.
        shrinkage: variance shrinkage pseudo-count.
        min_weight: sites whose gate weight is below this for every image are skipped.
        radii: each site's fallback radius ``(S,)``; ``None``: :func:`fallback_radii` of the descriptors.
    """

    def __init__(self, model_cfg: ModelConfig, shared: Mapping[str, torch.Tensor], sites: Sequence[Mapping[str, Any]],
                 policy: str = "uharmony", temperature: float = DEFAULT_TEMPERATURE,
                 shrinkage: float = DEFAULT_SHRINKAGE, min_weight: float = 1e-3,
                 radii: Sequence[float] | None = None) -> None:
        super().__init__()
        if not sites:
            raise ValueError("UniversalModel: expected at least one site")
        pol = get_policy(policy)
        check_policy(pol)
        self.net = build_model(model_cfg)
        load_shared(self.net, shared, pol)
        self.net.eval()
        self.model_cfg = model_cfg
        self.temperature = float(temperature)
        self.min_weight = float(min_weight)
        self.site_names = [str(s["site"]) for s in sites]
        keys = set(export_keys(self.net))
        for s in sites:
            if set(s["params"]) != keys:
                msg = f"UniversalModel: site {s['site']!r} does not hold exactly the model's restore and head keys"
                raise ValueError(msg)
        self.sites = nn.ModuleList(_SiteParams(s["params"]) for s in sites)
        descs = [DomainDescriptor.from_dict(s["descriptor"]) for s in sites]
        self.register_buffer("gate_means", torch.stack([d.mean for d in descs]))
        self.register_buffer("gate_vars", shrunk_variances(descs, shrinkage))
        self.register_buffer("gate_radii", fallback_radii(descs, self.gate_vars) if radii is None
                             else torch.as_tensor(radii, dtype=torch.float32).reshape(len(descs)))
        # Run settings of the federation, filled by load().
        self.data: DataConfig | None = None
        self.sw_batch_size = 2
        self.overlap = 0.25
        self.federation = ""

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> UniversalModel:
        """Read a file written by :func:`assemble` (checksum verified), in eval mode on ``device``.

        A file from before the fallback radii gets them computed from its descriptors.

        Raises:
            ValueError: not a universal-model file.
        """
        doc = load_payload(Path(path))
        if doc.get("kind") != UNIVERSAL_KIND or doc.get("version") != FORMAT_VERSION:
            msg = (f"{path}: not a uharmony-fed universal model (kind {doc.get('kind')!r}); make it "
                   "with 'uharmony-fed assemble', or predict without --universal")
            raise ValueError(msg)
        gate = doc.get("gate", {})
        um = cls(parse(ModelConfig, doc["model"], f"{path}: model"), doc["arrays"], doc["sites"],
                 policy=str(doc["policy"]), temperature=float(gate.get("temperature", DEFAULT_TEMPERATURE)),
                 shrinkage=float(gate.get("shrinkage", DEFAULT_SHRINKAGE)), radii=gate.get("radii"))
        if doc.get("data") is not None:
            um.data = parse(DataConfig, doc["data"], f"{path}: data")
        um.sw_batch_size = int(doc.get("sw_batch_size", 2))
        um.overlap = float(doc.get("overlap", 0.25))
        um.federation = str(doc["federation"])
        return um.to(device).eval()

    def descriptor(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` first-layer statistics of images ``x``."""
        return first_norm_statistics(self.net, x)

    def gate(self, x: torch.Tensor, fallback: bool = True) -> torch.Tensor:
        """Site weights ``(N, S)`` (rows sum to 1) of images ``x`` (whole volumes are best).

        ``fallback=False``: the plain softmax, without flattening far-away cases (:func:`gate_weights`).
        """
        f = self.descriptor(x)
        return gate_weights(gate_distances(f, self.gate_means, self.gate_vars),
                            gate_mahalanobis(f, self.gate_means, self.gate_vars),
                            self.gate_radii if fallback else None, self.temperature)

    def outside(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` ``k = min_s m_s / r_s``: how many radii images ``x`` lie from the nearest site (> 1: unseen)."""
        m = gate_mahalanobis(self.descriptor(x), self.gate_means, self.gate_vars)
        return (m / self.gate_radii[None]).min(-1).values

    def site_logits(self, x: torch.Tensor, s: int) -> torch.Tensor:
        """Region logits of site ``s``'s personalized model (a site's extra classes are dropped)."""
        return functional_call(self.net, self.sites[s].as_dict(), (x,))[:, : len(REGIONS)]

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """Gate-weighted logits ``(N, len(REGIONS), *spatial)``; ``gate`` ``(N, S)`` or ``(S,)`` overrides."""
        w = self.gate(x) if gate is None else gate.to(x.device).float()
        if w.ndim == 1:
            w = w.expand(x.shape[0], -1)
        out: torch.Tensor | None = None
        for s in range(len(self.sites)):
            ws = w[:, s]
            if float(ws.max()) < self.min_weight:
                continue
            term = ws.view(-1, *([1] * (x.ndim - 1))) * self.site_logits(x, s).float()
            out = term if out is None else out + term
        if out is None:  # every weight tiny (cannot happen for a softmax); fall back to the best
            return self.site_logits(x, int(w.mean(0).argmax()))
        return out


class GatedPredictor(nn.Module):
    """A :class:`UniversalModel` with its gate fixed (for sliding windows over one volume)."""

    def __init__(self, model: UniversalModel, gate: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("weights", gate.detach().reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, gate=self.weights)


__all__ = [
    "EXPORT_ROLES",
    "DomainDescriptor",
    "GatedPredictor",
    "UniversalModel",
    "assemble",
    "check_policy",
    "export_keys",
    "export_site",
    "fallback_radii",
    "first_norm_statistics",
    "gate_distances",
    "gate_mahalanobis",
    "gate_weights",
    "load_export",
    "shared_digest",
    "shrunk_variances",
    "site_descriptor",
]
