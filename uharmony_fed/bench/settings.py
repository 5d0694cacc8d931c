"""The benchmark's own configuration (configs/bench.yaml), parsed once into frozen objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uharmony_fed.config import load_yaml, parse
from uharmony_fed.fedconfig import FedConfig, _merge, load_config

#: The embedded default: the demo federation at benchmark size (configs/bench.yaml spells it out).
DEFAULT: dict[str, Any] = {
    "fed": {
        "name": "bench",
        "data_root": "bench_data",
        "demo": {"sites": 3, "cases": 8, "seed": 0},
        "model": {"features": [8, 16, 32, 64]},
        "data": {"spacing": [4.0, 4.0, 4.0], "roi_size": [32, 32, 32], "batch_size": 2, "samples_per_case": 2},
        "train": {"local_steps": 10, "lr": 0.01, "schedule": "cosine"},
        "federation": {"rounds": 6, "eval_every": 1, "wait_for_sites_s": 60.0},
        "simulation": {"cpus_per_site": 1.0, "threads_per_site": 1},
    },
}


@dataclass(frozen=True)
class LosoConfig:
    """Leave-one-site-out: train on every site but S, evaluate on S's held-out cases."""

    sites: tuple[str, ...] = ()  # empty: every site
    policies: tuple[str, ...] = ("fedavg", "fedbn", "fedper", "uharmony")
    seeds: int = 1
    centralized: bool = True


@dataclass(frozen=True)
class AblationConfig:
    """Variants of the layer and backbone, each a set of FedConfig overrides (model/data)."""

    seeds: int = 1
    rounds: int = 0  # 0: the main federation's rounds
    policy: str = "uharmony"
    run: tuple[str, ...] = ()  # names of the variants to run; empty: all
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class InferenceCost:
    """One BraTS-size volume through sliding-window inference."""

    features: tuple[int, ...] = (32, 64, 128, 256, 320)
    roi_size: tuple[int, int, int] = (128, 128, 128)
    volume: tuple[int, int, int, int] = (4, 240, 240, 155)
    sw_batch_size: int = 1
    overlap: float = 0.25
    time_bound_s: float = 900.0


@dataclass(frozen=True)
class ScalingCost:
    """Round time and server memory against the number of simulated sites (tiny model)."""

    sites: tuple[int, ...] = (3, 8, 16)
    cases: int = 3
    rounds: int = 1
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CostConfig:
    """Side-by-side cost measurements."""

    layer_sizes: tuple[tuple[int, ...], ...] = ((2, 32, 64, 64, 64), (2, 64, 32, 32, 32), (2, 128, 16, 16, 16))
    layer_min_run_s: float = 1.0
    round_rounds: int = 4
    inference: InferenceCost = field(default_factory=InferenceCost)
    scaling: ScalingCost = field(default_factory=ScalingCost)


@dataclass(frozen=True)
class BenchConfig:
    """Everything one ``uharmony-fed bench`` invocation runs.

    Attributes:
        fed: FedConfig overrides shared by every arm (same keys as fed.yaml).
        seeds: seeds of the accuracy arms.
        simulate_seeds: how many of ``seeds`` run the federated arms through ``simulate``;
            the rest use the in-process loop (same SiteRuntime code, same FedAvg).
        policies: federated arms.
        references: pooled arms, ``centralized`` (plain InstanceNorm) and ``oracle``.
        threads: torch threads of the in-process arms (0: all cores).
    """

    fed: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1, 2)
    simulate_seeds: int = 3
    policies: tuple[str, ...] = ("local-only", "fedavg", "fedbn", "fedper", "uharmony")
    references: tuple[str, ...] = ("centralized", "oracle")
    threads: int = 0
    loso: LosoConfig = field(default_factory=LosoConfig)
    ablations: AblationConfig = field(default_factory=AblationConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    overlay: bool = True

    def fed_config(self, overrides: dict[str, Any] | None = None) -> FedConfig:
        """The federation of one arm: ``fed`` plus ``overrides``."""
        return load_config(None, _merge(self.fed, overrides or {}))


def load_bench_config(path: str | Path | None, quick: bool = False) -> tuple[BenchConfig, dict[str, Any]]:
    """Read configs/bench.yaml (``None``: the embedded default); ``quick`` applies its ``quick:`` part.

    Returns:
        The parsed config and the merged raw dict (written into the report).

    Raises:
        ConfigError: naming the file and key of the first problem.
    """
    where = str(path) if path is not None else "embedded bench config"
    data = load_yaml(path) if path is not None else dict(DEFAULT)
    quick_part = data.pop("quick", {}) or {}
    if quick:
        data = _merge(data, quick_part)
    cfg = parse(BenchConfig, data, where)
    cfg.fed_config()  # validate the federation now, not an hour in
    return cfg, data
