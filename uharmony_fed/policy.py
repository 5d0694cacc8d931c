"""Sharing policies: the one rule that decides which tensors are aggregated and which stay local."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from uharmony_fed.model import ROLES, ModelConfig, build_model, param_roles


@dataclass(frozen=True)
class SharingPolicy:
    """Which roles a site keeps local; every other role is shared.

    Attributes:
        name: registry name.
        local_roles: subset of :data:`uharmony_fed.model.ROLES` that never leaves a site.
        federated: False for pooled (centralized) training, where nothing is exchanged.
    """

    name: str
    local_roles: frozenset[str]
    federated: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.local_roles) - set(ROLES)
        if unknown:
            msg = f"policy {self.name!r}: unknown roles {sorted(unknown)}, expected a subset of {ROLES}"
            raise ValueError(msg)


POLICIES: dict[str, SharingPolicy] = {}


def register_policy(policy: SharingPolicy) -> SharingPolicy:
    """Add ``policy`` to :data:`POLICIES`.

    Raises:
        ValueError: a policy of that name is already registered.
    """
    if policy.name in POLICIES:
        msg = f"sharing policy {policy.name!r} is already registered"
        raise ValueError(msg)
    POLICIES[policy.name] = policy
    return policy


def get_policy(name: str) -> SharingPolicy:
    """The registered policy ``name``.

    Raises:
        ValueError: unknown name (the valid names and a close match are given).
    """
    if name not in POLICIES:
        near = difflib.get_close_matches(name, list(POLICIES), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        msg = f"unknown sharing policy {name!r}{hint} (valid: {', '.join(POLICIES)})"
        raise ValueError(msg)
    return POLICIES[name]


for _policy in (
    SharingPolicy("local-only", frozenset(ROLES)),
    SharingPolicy("fedavg", frozenset()),
    SharingPolicy("fedbn", frozenset({"harmonize", "restore", "norm", "adapter"})),
    SharingPolicy("fedper", frozenset({"head", "adapter"})),
    SharingPolicy("uharmony", frozenset({"restore", "head", "adapter"})),
    SharingPolicy("centralized", frozenset(), federated=False),
):
    register_policy(_policy)


def _storage_id(t: torch.Tensor) -> tuple[Any, ...]:
    """Identity of the memory a tensor views (two aliases of one tensor compare equal)."""
    ptr = t.untyped_storage().data_ptr() if t.numel() else 0
    if ptr == 0:  # empty or meta tensors have no address: fall back to the object
        return ("id", id(t))
    return (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def canonical_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without aliases: each tensor once, under its first name.

    DynUNet, for example, lists every encoder tensor also under ``skip_layers.*``.
    Values are the model's own tensors (detached, not copied).
    """
    seen: set[tuple[Any, ...]] = set()
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        sid = _storage_id(t)
        if sid not in seen:
            seen.add(sid)
            out[key] = t.detach()
    return out


def split_keys(model: nn.Module, policy: SharingPolicy) -> tuple[list[str], list[str]]:
    """Split the de-aliased state-dict keys into (shared, local) by role.

    Returns:
        Disjoint lists of keys in state-dict order that together cover every unique tensor.
    """
    roles = param_roles(model)
    shared: list[str] = []
    local: list[str] = []
    for key in canonical_state(model):
        (local if roles[key] in policy.local_roles else shared).append(key)
    return shared, local


class SharedStateError(ValueError):
    """Received shared arrays do not match what the policy shares."""


def _names(keys: set[str], limit: int = 8) -> str:
    ordered = sorted(keys)
    more = f" ... (+{len(ordered) - limit} more)" if len(ordered) > limit else ""
    return ", ".join(ordered[:limit]) + more


def load_shared(model: nn.Module, shared: Mapping[str, torch.Tensor], policy: SharingPolicy) -> None:
    """Copy received shared tensors into ``model`` in place, checking the contract.

    The received keys must be exactly the policy's shared keys of ``model`` (so the keys
    not received are exactly the local ones) with matching shapes. Copies go through
    ``copy_`` into the model's own tensors, so aliases (same storage) update too.

    Args:
        model: the site's model.
        shared: ``{key: tensor}`` as sent by the server (CPU or any device, any float dtype).
        policy: the sharing policy both sides agreed on.

    Raises:
        SharedStateError: missing or extra keys (named), or a shape mismatch.
    """
    expected, _ = split_keys(model, policy)
    missing = set(expected) - set(shared)
    extra = set(shared) - set(expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} shared keys: {_names(missing)}")
        if extra:
            parts.append(f"got {len(extra)} keys that policy {policy.name!r} does not share: {_names(extra)}")
        raise SharedStateError("; ".join(parts))
    state = model.state_dict(keep_vars=True)
    bad = [
        f"{k}: expected {tuple(state[k].shape)}, found {tuple(shared[k].shape)}"
        for k in expected
        if tuple(state[k].shape) != tuple(shared[k].shape)
    ]
    if bad:
        msg = f"shape mismatch in {len(bad)} shared tensors: " + "; ".join(bad[:8])
        raise SharedStateError(msg)
    with torch.no_grad():
        for k in expected:
            state[k].copy_(torch.as_tensor(shared[k]))


def plan(model: nn.Module, policy: SharingPolicy) -> dict[str, Any]:
    """What ``policy`` would exchange for ``model``.

    Returns:
        ``shared_tensors``, ``shared_params``, ``local_tensors``, ``local_params``,
        ``bytes_per_round`` (the shared arrays as float32, sent by one site per round;
        0 when not federated) and ``federated``.
    """
    state = canonical_state(model)
    shared, local = split_keys(model, policy)
    n_shared = sum(state[k].numel() for k in shared)
    return {
        "shared_tensors": len(shared),
        "shared_params": n_shared,
        "local_tensors": len(local),
        "local_params": sum(state[k].numel() for k in local),
        "bytes_per_round": 4 * n_shared if policy.federated else 0,
        "federated": policy.federated,
    }


def plan_all(model_cfg: ModelConfig) -> dict[str, dict[str, Any]]:
    """:func:`plan` of every registered policy for the model ``model_cfg`` builds."""
    model = build_model(model_cfg)
    return {name: plan(model, policy) for name, policy in POLICIES.items()}


def format_plan(table: Mapping[str, Mapping[str, Any]]) -> str:
    """An aligned text table of :func:`plan_all`'s result, one row per policy."""
    header = ["policy", "shared tensors", "shared params", "local tensors", "local params", "sent/site/round"]
    rows = [header]
    for name, p in table.items():
        sent = _human_bytes(p["bytes_per_round"]) if p.get("federated", True) else "pooled data"
        rows.append(
            [
                name,
                str(p["shared_tensors"]),
                f"{p['shared_params']:,}",
                str(p["local_tensors"]),
                f"{p['local_params']:,}",
                sent,
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for j, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} GiB"
