"""One site on its own: train and validate without a federation (the local-only baseline).

The same :class:`SiteRuntime` a ClientApp uses, driven by a plain loop, so that a site can
check its data and the model end to end before it joins a federation.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import yaml

from uharmony_fed.checkpoint import atomic_write_bytes, save_payload
from uharmony_fed.config import to_dict
from uharmony_fed.data import load_site_config
from uharmony_fed.fed.site_runtime import SiteRuntime
from uharmony_fed.fed.wire import RoundSpec
from uharmony_fed.fedconfig import FedConfig, config_to_dict


def train_site(cfg: FedConfig, site_config: Path, run_dir: Path, progress: bool = True) -> dict[str, float]:
    """Train a site's model alone for ``federation.rounds`` x ``train.local_steps`` steps.

    Validates after every ``train.local_steps`` steps, appends metrics to
    ``run_dir/metrics.jsonl``, keeps the model at the site (its state folder, federation
    ``<name>-local``), and writes ``run_dir/final_shared.ckpt`` so ``predict`` can use it.

    Returns:
        The last validation metrics.
    """
    cfg = replace(cfg, name=f"{cfg.name}-local", federation=replace(cfg.federation, policy="local-only"))
    site = load_site_config(site_config)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "fed.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode())
    runtime = SiteRuntime(site, RoundSpec.from_fed(cfg, 1), progress=progress)
    runtime.restore_state(None)
    metrics: dict[str, float] = {}
    for rnd in range(1, cfg.federation.rounds + 1):
        spec = RoundSpec.from_fed(cfg, rnd)
        start = time.perf_counter()
        train = runtime.train_round(spec)
        metrics = runtime.evaluate(spec)
        runtime.save_state(rnd)
        with open(run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"round": rnd, "phase": "train", "site": site.name, **train}) + "\n")
            fh.write(json.dumps({"round": rnd, "phase": "eval", "site": site.name, **metrics}) + "\n")
        dice = ", ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items() if k.startswith("dice-"))
        print(f"[{rnd}/{cfg.federation.rounds}] {site.name}: loss {train['train-loss']:.4f}, "
              f"Dice {dice} ({time.perf_counter() - start:.1f} s)", flush=True)
    save_payload(run_dir / "final_shared.ckpt", {
        "arrays": runtime.shared_tensors(), "policy": cfg.federation.policy,
        "model": to_dict(cfg.model), "rounds": cfg.federation.rounds, "name": cfg.name})
    return metrics
