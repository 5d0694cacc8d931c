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
    return wrapper(strategy, noise_multiplier=dp.noise_multiplier, clipping_norm=dp.clipping_norm,
                   num_sampled_clients=len(cfg.sites))


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """The strategy's mutable data (FedAdam's moments, ...) for a checkpoint."""
    return {k: v for k, v in vars(strategy).items() if not callable(v)}


def load_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Put back what :func:`strategy_state` saved."""
    for key, value in state.items():
        setattr(strategy, key, value)
