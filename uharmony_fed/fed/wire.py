"""The exchange contract: what a round message and a reply may hold."""

from __future__ import annotations

import json
from dataclasses import dataclass

from uharmony_fed.config import parse, to_dict
from uharmony_fed.data import DataConfig
from uharmony_fed.fedconfig import FedConfig, TrainConfig
from uharmony_fed.model import ModelConfig

#: Record keys of every message (Flower's strategies use the same defaults).
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"


@dataclass(frozen=True)
class RoundSpec:
    """The settings the server sends to every site with each round.

    Sites do not read fed.yaml: the server owns the experiment, the site owns its data
    and paths. Nothing here names a file, a case or a patient.
    """

    federation: str
    policy: str
    server_round: int
    total_rounds: int
    seed: int
    prox_mu: float
    model: ModelConfig
    data: DataConfig
    train: TrainConfig

    @classmethod
    def from_fed(cls, cfg: FedConfig, server_round: int) -> RoundSpec:
        """The spec of round ``server_round`` of the configured federation."""
        prox = cfg.train.prox_mu if cfg.federation.strategy == "fedprox" else 0.0
        return cls(cfg.name, cfg.federation.policy, server_round, cfg.federation.rounds,
                   cfg.seed, prox, cfg.model, cfg.data, cfg.train)

    def to_record(self) -> dict[str, str | int | float]:
        """Flat scalar values for a Flower ConfigRecord."""
        return {
            "federation": self.federation,
            "policy": self.policy,
            "server-round": self.server_round,
            "total-rounds": self.total_rounds,
            "seed": self.seed,
            "prox-mu": self.prox_mu,
            "model": json.dumps(to_dict(self.model)),
            "data": json.dumps(to_dict(self.data)),
            "train": json.dumps(to_dict(self.train)),
        }

    @classmethod
    def from_record(cls, rec: dict) -> RoundSpec:
        """Parse a received ConfigRecord (validated like a config file)."""
        return cls(
            federation=str(rec["federation"]),
            policy=str(rec["policy"]),
            server_round=int(rec["server-round"]),
            total_rounds=int(rec["total-rounds"]),
            seed=int(rec["seed"]),
            prox_mu=float(rec["prox-mu"]),
            model=parse(ModelConfig, json.loads(str(rec["model"])), "round.model"),
            data=parse(DataConfig, json.loads(str(rec["data"])), "round.data"),
            train=parse(TrainConfig, json.loads(str(rec["train"])), "round.train"),
        )
