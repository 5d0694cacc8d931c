"""Flower's aggregation strategies by name, configured from fed.yaml."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

from flwr.serverapp import RdpAccountant
from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod

from uharmony_fed.fedconfig import FedConfig

StrategyFactory = Callable[[FedConfig, dict[str, Any]], Strategy]
STRATEGIES: dict[str, StrategyFactory] = {}


def register_strategy(name: str) -> Callable[[StrategyFactory], StrategyFactory]:
    """Add a strategy factory under ``name``; a name is registered once."""

    def deco(fn: StrategyFactory) -> StrategyFactory:
        if name in STRATEGIES:
            msg = f"strategy {name!r} is already registered"
            raise ValueError(msg)
        STRATEGIES[name] = fn
        return fn

    return deco


def _common(cfg: FedConfig) -> dict[str, Any]:
    # The server waits for sites itself (k-of-n with a deadline), then samples every
    # connected site; Flower's own wait (which has no deadline) is never reached.
    k = cfg.federation.min_sites
    return {"fraction_train": 1.0, "fraction_evaluate": 1.0, "min_train_nodes": k,
            "min_evaluate_nodes": k, "min_available_nodes": k}


@register_strategy("fedavg")
def _fedavg(cfg: FedConfig, args: dict[str, Any]) -> Strategy:
    return FedAvg(**_common(cfg), **args)


@register_strategy("fedprox")
def _fedprox(cfg: FedConfig, args: dict[str, Any]) -> Strategy:
    return FedProx(**_common(cfg), proximal_mu=cfg.train.prox_mu, **args)


@register_strategy("fedadam")
def _fedadam(cfg: FedConfig, args: dict[str, Any]) -> Strategy:
    defaults = {"eta": 1e-2, "eta_l": cfg.train.lr, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    return FedAdam(**_common(cfg), **{**defaults, **args})


@register_strategy("fedmedian")
def _fedmedian(cfg: FedConfig, args: dict[str, Any]) -> Strategy:
    return FedMedian(**_common(cfg), **args)


@register_strategy("fedtrimmedavg")
def _fedtrimmedavg(cfg: FedConfig, args: dict[str, Any]) -> Strategy:
    return FedTrimmedAvg(**_common(cfg), **{"beta": 0.2, **args})


@register_strategy("krum")
def _krum(cfg: FedConfig, args: dict[str, Any]) -> Strategy:
    args = {"num_malicious_nodes": 1, **args}
    args["num_malicious_nodes"] = int(args["num_malicious_nodes"])
    return Krum(**_common(cfg), **args)


def build_strategy(cfg: FedConfig) -> Strategy:
    """The configured Flower strategy.

    Raises:
        ValueError: an unknown strategy name or an argument the strategy does not take.
    """
    name = cfg.federation.strategy
    if name not in STRATEGIES:
        near = difflib.get_close_matches(name, list(STRATEGIES), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        msg = f"federation.strategy: unknown {name!r}{hint} (valid: {', '.join(STRATEGIES)})"
        raise ValueError(msg)
    try:
        strategy = STRATEGIES[name](cfg, dict(cfg.federation.strategy_args))
    except TypeError as exc:
        msg = f"federation.strategy_args: {exc}"
        raise ValueError(msg) from exc
    dp = cfg.federation.dp
    if dp.mode == "off":
        return strategy
    # Flower's wrappers scale the noise by the number of sites sampled per round; the
    # loop samples every connected site, at most all configured ones.
    wrapper = (DifferentialPrivacyServerSideFixedClipping if dp.mode == "server-fixed"
               else DifferentialPrivacyClientSideFixedClipping)
    accountant = None
    if name == "fedavg" and dp.noise_multiplier > 0:
        # Flower's accountant covers plain FedAvg with equal weights and no sampling
        # amplification (every connected site takes part in every round).
        strategy = FedAvg(**_common(cfg), weighted_by_key="unit-weight")
        accountant = RdpAccountant(PrivacyConfig(
            target_delta=dp.target_delta, population_size=len(cfg.sites),
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
    return wrapper(strategy, noise_multiplier=dp.noise_multiplier, clipping_norm=dp.clipping_norm,
                   num_sampled_clients=len(cfg.sites), accountant=accountant)


def privacy_spent(strategy: Strategy) -> float | None:
    """Epsilon spent so far by a DP-accounted strategy, else None."""
    spent = getattr(strategy, "privacy_spent", None)
    result = spent() if callable(spent) else None
    return None if result is None else float(result.epsilon)


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """The strategy's mutable data (FedAdam's moments, the DP accountant, ...) for a checkpoint."""
    state: dict[str, Any] = {}
    for key, value in vars(strategy).items():
        if key == "accountant" and value is not None:
            state[key] = {"state_dict": value.state_dict()}  # the accountant's own format
        elif not callable(value):
            state[key] = value
    return state


def load_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Put back what :func:`strategy_state` saved."""
    for key, value in state.items():
        if key == "accountant" and isinstance(value, dict) and "state_dict" in value:
            strategy.accountant.load_state_dict(value["state_dict"])  # type: ignore[attr-defined]
        else:
            setattr(strategy, key, value)
