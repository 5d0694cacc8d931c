"""Contract tests of the sharing policies over every architecture."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from uharmony_fed.model import ModelConfig, build_model, param_roles
from uharmony_fed.policy import (
    POLICIES,
    SharedStateError,
    SharingPolicy,
    canonical_state,
    format_plan,
    get_policy,
    load_shared,
    plan,
    plan_all,
    register_policy,
    split_keys,
)

DYN = ModelConfig(arch="dynunet", features=(4, 8, 16), head_channels=4)
#: One model per architecture, with plain norms too (placement), so every role occurs.
CONFIGS = {
    "dynunet": dataclasses.replace(DYN, placement="first:1", input_adapter="linear"),
    "swinunetr": ModelConfig(arch="swinunetr", head_channels=4, placement="first:2"),
}

#: The DESIGN table, written out: which roles each strategy keeps at the site.
TABLE = {
    "local-only": {"backbone", "harmonize", "restore", "norm", "head", "adapter"},
    "fedavg": set(),
    "fedbn": {"harmonize", "restore", "norm", "adapter"},
    "fedper": {"head", "adapter"},
    "uharmony": {"restore", "head", "adapter"},
    "centralized": set(),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request: pytest.FixtureRequest) -> nn.Module:
    torch.manual_seed(0)
    return build_model(CONFIGS[request.param])


def _storage(t: torch.Tensor) -> tuple[int, int]:
    return (t.untyped_storage().data_ptr(), t.storage_offset())


def test_registry_holds_the_design_table() -> None:
    assert set(POLICIES) == set(TABLE)
    assert {name: set(p.local_roles) for name, p in POLICIES.items()} == TABLE
    assert [n for n, p in POLICIES.items() if not p.federated] == ["centralized"]


def test_every_role_occurs(model: nn.Module) -> None:
    roles = {"backbone", "harmonize", "restore", "norm", "head"}
    if model.adapter is not None:
        roles.add("adapter")
    assert set(param_roles(model).values()) == roles


@pytest.mark.parametrize("name", list(TABLE))
def test_split_contract(model: nn.Module, name: str) -> None:
    policy = get_policy(name)
    shared, local = split_keys(model, policy)
    state = model.state_dict()
    unique = {_storage(t) for t in state.values()}
    assert not set(shared) & set(local)
    assert len(shared) + len(local) == len(unique)
    assert {_storage(state[k]) for k in shared + local} == unique
    assert len({_storage(state[k]) for k in shared}) == len(shared)  # no alias crosses twice
    assert not any(k.split(".")[1] == "skip_layers" for k in shared + local)

    roles = param_roles(model)
    shared_roles = {roles[k] for k in shared}
    local_roles = {roles[k] for k in local}
    adapter = {"adapter"} if model.adapter is not None else set()
    if name == "uharmony":
        assert shared_roles == {"backbone", "harmonize", "norm"}
        assert local_roles == {"restore", "head"} | adapter
    elif name == "fedbn":
        assert shared_roles == {"backbone", "head"}
        assert local_roles == {"harmonize", "restore", "norm"} | adapter
    elif name == "fedper":
        assert local_roles == {"head"} | adapter and "head" not in shared_roles
    elif name == "local-only":
        assert shared == []
    else:  # fedavg, centralized
        assert local == []


def test_dynunet_skip_aliases_removed() -> None:
    model = build_model(DYN)
    full = model.state_dict()
    canon = canonical_state(model)
    aliases = [k for k in full if ".skip_layers." in f".{k}"]
    assert aliases, "DynUNet is expected to list encoder tensors under skip_layers"
    assert not any(".skip_layers." in f".{k}" for k in canon)
    assert len(canon) == len(full) - len(aliases)


def _other_model(cfg: ModelConfig) -> nn.Module:
    torch.manual_seed(123)
    other = build_model(cfg)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.rand_like(p))  # move the identity-initialised coefficients too
    return other


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("name", ["uharmony", "fedbn", "fedavg"])
def test_load_shared_round_trip(arch: str, name: str) -> None:
    policy = get_policy(name)
    torch.manual_seed(0)
    site = build_model(CONFIGS[arch])
    server = _other_model(CONFIGS[arch])
    shared, local = split_keys(site, policy)
    local_before = {k: v.clone() for k, v in canonical_state(site).items() if k in local}
    sent = {k: v.clone() for k, v in canonical_state(server).items() if k in shared}
    sent = {k: v.numpy() if k.endswith("bias") else v for k, v in sent.items()}  # arrays too
    load_shared(site, sent, policy)
    site_state, server_state = site.state_dict(), server.state_dict()
    for k in shared:
        torch.testing.assert_close(site_state[k], server_state[k])
    for k, v in local_before.items():
        torch.testing.assert_close(site_state[k], v)
    # Aliases (DynUNet skip_layers) see the loaded values: every key, aliases included, matches.
    roles = param_roles(site)
    for k in site_state:
        if roles[k] not in policy.local_roles:
            torch.testing.assert_close(site_state[k], server_state[k])


def test_load_shared_rejects_wrong_keys_and_shapes() -> None:
    policy = get_policy("uharmony")
    site = build_model(DYN)
    before = {k: v.clone() for k, v in site.state_dict().items()}
    shared, local = split_keys(site, policy)
    good = {k: v.clone() for k, v in canonical_state(site).items() if k in shared}

    missing = dict(good)
    gone = shared[3]
    del missing[gone]
    with pytest.raises(SharedStateError, match=f"missing 1 shared keys: {gone}"):
        load_shared(site, missing, policy)

    extra = {**good, local[0]: canonical_state(site)[local[0]]}
    with pytest.raises(SharedStateError, match=f"does not share: {local[0]}"):
        load_shared(site, extra, policy)

    alias = next(k for k in site.state_dict() if "skip_layers" in k)
    with pytest.raises(SharedStateError, match="skip_layers"):
        load_shared(site, {**good, alias: site.state_dict()[alias]}, policy)

    bad = {**good, shared[0]: torch.zeros(1)}
    with pytest.raises(SharedStateError, match=f"{shared[0]}: expected"):
        load_shared(site, bad, policy)

    for k, v in site.state_dict().items():  # a rejected load changes nothing
        assert torch.equal(v, before[k]), k


def test_plan_counts(model: nn.Module) -> None:
    canon = canonical_state(model)
    total = sum(t.numel() for t in canon.values())
    for name, policy in POLICIES.items():
        p = plan(model, policy)
        assert p["shared_tensors"] + p["local_tensors"] == len(canon)
        assert p["shared_params"] + p["local_params"] == total
        assert p["bytes_per_round"] == (4 * p["shared_params"] if policy.federated else 0)
    assert plan(model, get_policy("local-only"))["bytes_per_round"] == 0
    assert plan(model, get_policy("fedavg"))["shared_params"] == total


def test_plan_all_and_format() -> None:
    table = plan_all(DYN)
    assert list(table) == list(POLICIES)
    text = format_plan(table)
    lines = text.splitlines()
    assert len(lines) == 2 + len(POLICIES)
    assert all(line.split()[0] in POLICIES for line in lines[2:])
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule aligned
    assert "pooled" in lines[-1]


def test_registry_errors() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_policy(SharingPolicy("fedavg", frozenset()))
    with pytest.raises(ValueError, match="did you mean 'fedbn'"):
        get_policy("fedbm")
    with pytest.raises(ValueError, match="unknown roles"):
        SharingPolicy("x", frozenset({"bn"}))
