"""The run configuration (fed.yaml): one frozen object per owner, parsed once."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from uharmony_fed.config import ConfigError, load_yaml, parse, to_dict
from uharmony_fed.data import DataConfig
from uharmony_fed.model import ModelConfig
from uharmony_fed.policy import POLICIES

StrategyName = Literal["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum"]


@dataclass(frozen=True)
class TrainConfig:
    """Local training and validation at a site, sent to every site each round.

    ``join_warmup_rounds``: a site that joins a running federation (it has trained fewer
    than that many rounds' steps while the federation is past them) first trains only its
    own part (restore, head) for that many rounds, on the frozen shared model, and sends
    the shared arrays back unchanged, so that a fresh head's large early gradients do not
    reach the backbone the other sites rely on.
    """

    local_steps: int = 20
    lr: float = 3e-3
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 1e-5
    schedule: Literal["constant", "cosine"] = "cosine"
    prox_mu: float = 0.01
    sw_batch_size: int = 2
    sw_overlap: float = 0.25
    hd95: bool = False
    amp: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    join_warmup_rounds: int = 0

    def __post_init__(self) -> None:
        if self.join_warmup_rounds < 0:
            msg = f"train.join_warmup_rounds must be >= 0, found {self.join_warmup_rounds}"
            raise ValueError(msg)
        if self.local_steps < 1:
            msg = f"train.local_steps must be >= 1, found {self.local_steps}"
            raise ValueError(msg)
        if not self.lr > 0:
            msg = f"train.lr must be > 0, found {self.lr}"
            raise ValueError(msg)


@dataclass(frozen=True)
class DPConfig:
    """Optional differential privacy on the shared update (Flower's fixed-clipping wrappers).

    ``server-fixed``: the server clips each site's update and adds Gaussian noise to the
    aggregate; ``client-fixed``: each site clips its own update before it leaves, the
    server adds the noise. With a positive noise multiplier and the fedavg strategy, the
    epsilon spent at ``target_delta`` is accounted (Flower's RDP accountant) and reported
    every round; accounted rounds weight every site equally, as the accounting assumes.
    """

    mode: Literal["off", "server-fixed", "client-fixed"] = "off"
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    target_delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0 or not self.clipping_norm > 0:
            msg = (f"federation.dp: noise_multiplier must be >= 0 and clipping_norm > 0, found "
                   f"{self.noise_multiplier} and {self.clipping_norm}")
            raise ValueError(msg)


@dataclass(frozen=True)
class FederationConfig:
    """What is shared, how it is aggregated, and how long the server waits."""

    policy: str = "uharmony"
    strategy: StrategyName = "fedavg"
    strategy_args: dict[str, float] = field(default_factory=dict)
    rounds: int = 8
    min_sites: int = 2
    wait_for_sites_s: float = 120.0
    round_timeout_s: float = 3600.0
    max_update_norm: float = 0.0
    eval_every: int = 1
    dp: DPConfig = field(default_factory=DPConfig)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            msg = f"federation.policy: expected one of {', '.join(POLICIES)}, found {self.policy!r}"
            raise ValueError(msg)
        if self.rounds < 1 or self.min_sites < 1 or self.eval_every < 1:
            msg = "federation.rounds, min_sites and eval_every must be >= 1"
            raise ValueError(msg)


@dataclass(frozen=True)
class ServerConfig:
    """Where the SuperLink listens and how it authenticates (deployment only)."""

    host: str = "0.0.0.0"
    port: int = 9092
    insecure: bool = False
    certs_dir: Path = Path("certs")
    supernode_auth: bool = True


@dataclass(frozen=True)
class DemoConfig:
    """How to generate the demo federation when ``data_root`` does not exist yet."""

    sites: int = 3
    cases: int = 8
    seed: int = 0


@dataclass(frozen=True)
class SimulationConfig:
    """Flower simulation engine resources for ``uharmony-fed simulate``."""

    cpus_per_site: float = 1.0
    gpus_per_site: float = 0.0
    threads_per_site: int = 1


@dataclass(frozen=True)
class FedConfig:
    """The whole run configuration. Its defaults are the demo federation."""

    name: str = "demo"
    seed: int = 0
    data_root: Path = Path("demo_data")
    sites: tuple[str, ...] = ("hospitalA", "hospitalB", "hospitalC")
    demo: DemoConfig | None = field(default_factory=DemoConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    def __post_init__(self) -> None:
        if not self.sites:
            raise ValueError("sites: list at least one site name")
        if len(set(self.sites)) != len(self.sites):
            msg = f"sites: names must be unique, found {list(self.sites)}"
            raise ValueError(msg)
        if self.federation.min_sites > len(self.sites):
            msg = (
                f"federation.min_sites ({self.federation.min_sites}) is larger than the "
                f"number of sites ({len(self.sites)})"
            )
            raise ValueError(msg)

    def site_config_path(self, site: str) -> Path:
        """Where the simulation finds a site's own ``site.yaml``."""
        return self.data_root / site / "site.yaml"


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> FedConfig:
    """Read and validate fed.yaml (``None``: the embedded demo default).

    Relative paths (``data_root``, ``server.certs_dir``) are resolved against the current
    directory, so the spawned Flower processes see the same files.

    Raises:
        ConfigError: naming the file and key path of the first problem.
    """
    where = f"{path}:" if path is not None else "default config:"
    data = load_yaml(path) if path is not None else {}
    if overrides:
        data = _merge(data, overrides)
    cfg = parse(FedConfig, data, where)
    return replace(
        cfg,
        data_root=cfg.data_root.expanduser().resolve(),
        server=replace(cfg.server, certs_dir=cfg.server.certs_dir.expanduser().resolve()),
    )


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_to_dict(cfg: FedConfig) -> dict:
    """The YAML-ready form of a config (written into every run directory)."""
    return to_dict(cfg)


__all__ = [
    "ConfigError",
    "DPConfig",
    "DemoConfig",
    "FedConfig",
    "FederationConfig",
    "ServerConfig",
    "SimulationConfig",
    "TrainConfig",
    "config_to_dict",
    "load_config",
]
