"""The arms of the benchmark: federated (simulate or in-process), pooled references, LOSO.

Every arm trains with the same code (``SiteRuntime`` / ``train_steps`` / ``evaluate``), the
same data splits and seeds, and the same number of local steps per site.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import torch
from monai.utils import set_determinism
from torch import nn

from uharmony_fed.checkpoint import load_payload, save_payload
from uharmony_fed.data import build_datasets, data_loader, load_site_config
from uharmony_fed.fed.launch import ensure_demo, simulate
from uharmony_fed.fed.server_loop import initial_shared_arrays
from uharmony_fed.fed.site_runtime import SiteRuntime
from uharmony_fed.fed.wire import RoundSpec
from uharmony_fed.fedconfig import FedConfig
from uharmony_fed.model import build_model
from uharmony_fed.policy import canonical_state, get_policy, load_shared, split_keys
from uharmony_fed.report import read_metrics
from uharmony_fed.train import evaluate, make_optimizer, pick_device, scheduled_lr, train_steps

from uharmony_fed.bench import summary

#: Local roles of the pooled oracle: per-site head and U-Harmony restore (as the uharmony policy).
ORACLE_LOCAL = frozenset({"restore", "head"})


def site_state_dir(cfg: FedConfig, site: str) -> Path:
    """Where ``simulate`` keeps a site's local state for federation ``cfg.name``."""
    sc = load_site_config(cfg.site_config_path(site))
    return Path(sc.state_dir) / cfg.name


def reset_state(cfg: FedConfig) -> None:
    """Remove the sites' saved local state of this federation name, so a run starts afresh."""
    for site in cfg.sites:
        shutil.rmtree(site_state_dir(cfg, site), ignore_errors=True)


def record(arm: str, cfg: FedConfig, runtime: str, rows: list[dict], run_dir: Path, wall: float,
           **extra: Any) -> dict[str, Any]:
    """The benchmark's summary of one run, from its metrics rows."""
    rounds, values, seconds = summary.curve(rows)
    per_round: dict[int, dict[str, dict[str, float]]] = {}
    for row in rows:
        if row.get("phase") == "eval":
            per_round.setdefault(int(row["round"]), {})[row["site"]] = {
                k: float(v) for k, v in row.items() if k in summary.METRICS}
    return {
        "arm": arm, "seed": cfg.seed, "runtime": runtime, "policy": cfg.federation.policy,
        "federation": cfg.name, "sites": list(cfg.sites), "rounds": cfg.federation.rounds,
        "local_steps": cfg.train.local_steps, "run_dir": str(run_dir), "wall_s": wall,
        "curve": [{"round": r, "dice": v, "seconds": s, "sites": per_round.get(r, {})}
                  for r, v, s in zip(rounds, values, seconds)],
        "final": summary.final_per_site(rows), **extra,
    }


# ----------------------------------------------------------------------------- memory


class ProcessMonitor:
    """Peak RSS of this process's children while a federation runs, grouped by role.

    Flower's simulation starts a SuperLink, an ``flwr-simulation`` process (the ServerApp
    and the simulation driver) and Ray actors (``ClientAppActor``) that host the sites.
    """

    ROLES = {"site (ClientAppActor)": "ClientAppActor", "server (flwr-simulation)": "flwr-simulation",
             "superlink": "flower-superlink"}

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for proc in me.children(recursive=True):
                try:
                    cmd = " ".join(proc.cmdline())
                    rss = proc.memory_info().rss
                except (psutil.Error, OSError):
                    continue
                for role, needle in self.ROLES.items():
                    if needle in cmd:
                        self.peak[role] = max(self.peak.get(role, 0), rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> ProcessMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ----------------------------------------------------------------------------- federated


def run_simulated(arm: str, cfg: FedConfig, run_dir: Path, timeout: float | None = None) -> dict[str, Any]:
    """One federation on Flower's simulation engine (the product's runtime).

    Raises:
        RuntimeError: the simulation failed (its log folder is named).
    """
    ensure_demo(cfg)
    reset_state(cfg)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    with ProcessMonitor() as mon:
        result = simulate(cfg, run_dir, echo=False, timeout=timeout)
    if result.returncode != 0:
        msg = f"simulate {arm} (seed {cfg.seed}) failed with exit {result.returncode}; logs in {run_dir / 'logs'}"
        raise RuntimeError(msg)
    rows = read_metrics(run_dir)
    for site in cfg.sites:
        src = site_state_dir(cfg, site) / "local_state.ckpt"
        if src.is_file():
            (run_dir / "local").mkdir(exist_ok=True)
            shutil.copy2(src, run_dir / "local" / f"{site}.ckpt")
    round_s = sum(float(r["seconds"]) for r in rows if r.get("phase") == "round")
    return record(arm, cfg, "simulate", rows, run_dir, result.seconds,
                  startup_s=max(result.seconds - round_s, 0.0),
                  round_seconds=[float(r["seconds"]) for r in rows if r.get("phase") == "round"],
                  peak_rss=dict(mon.peak))


def _runtimes(cfg: FedConfig, sites: tuple[str, ...]) -> dict[str, SiteRuntime]:
    spec = RoundSpec.from_fed(cfg, 1)
    return {s: SiteRuntime(load_site_config(cfg.site_config_path(s)), spec) for s in sites}


def fedavg(updates: list[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """Example-weighted mean of the sites' shared tensors (Flower's FedAvg on an ArrayRecord)."""
    total = sum(n for _, n in updates)
    keys = updates[0][0].keys()
    return {k: sum(t[k].float() * (n / total) for t, n in updates) for k in keys}  # type: ignore[misc]


def train_and_average(runtimes: dict[str, SiteRuntime], arrays: dict[str, torch.Tensor],
                      spec: RoundSpec) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    """One in-process round: every site merges ``arrays`` and trains, then the weighted mean.

    Returns:
        The new global shared arrays (unchanged when nothing is shared) and each site's
        train metrics.
    """
    updates, metrics = [], {}
    for site, rt in runtimes.items():
        rt.load_global(arrays)
        metrics[site] = rt.train_round(spec)
        updates.append((rt.shared_tensors(), metrics[site]["num-examples"]))
    return (fedavg(updates) if updates[0][0] else arrays), metrics


def run_inprocess(arm: str, cfg: FedConfig, run_dir: Path, eval_every: int | None = None,
                  log: Callable[[str], None] = print) -> tuple[dict[str, Any], dict[str, SiteRuntime],
                                                               dict[str, torch.Tensor]]:
    """The same federation in one process: every site's ``SiteRuntime`` in turn, then FedAvg.

    Same local steps, learning-rate schedule, initial shared arrays and example-weighted
    mean as the Flower run; no messages, no processes. Used for the seeds and ablations
    that ``--quick`` does not send through ``simulate``, and for LOSO.

    Returns:
        The run record, the site runtimes (their models hold the personalized weights) and
        the final global shared arrays.
    """
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    start = time.perf_counter()
    runtimes = _runtimes(cfg, cfg.sites)
    arrays = initial_shared_arrays(cfg)
    every = eval_every or cfg.federation.eval_every
    rows: list[dict] = []
    fed = cfg.federation
    for rnd in range(1, fed.rounds + 1):
        t0 = time.perf_counter()
        spec = RoundSpec.from_fed(cfg, rnd)
        arrays, trained = train_and_average(runtimes, arrays, spec)
        rows += [{"round": rnd, "phase": "train", "site": site, **m} for site, m in trained.items()]
        if rnd % every == 0 or rnd == fed.rounds:
            for site, rt in runtimes.items():
                rt.load_global(arrays)
                rows.append({"round": rnd, "phase": "eval", "site": site, **rt.evaluate(spec)})
        rows.append({"round": rnd, "phase": "round", "seconds": time.perf_counter() - t0, "sites": len(runtimes)})
    with open(run_dir / "metrics.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    save_payload(run_dir / "final_shared.ckpt", {"arrays": arrays, "policy": fed.policy})
    (run_dir / "local").mkdir()
    for site, rt in runtimes.items():
        save_payload(run_dir / "local" / f"{site}.ckpt", {"round": fed.rounds, "step": rt.state.step,
                                                          "local": rt.local_tensors(), "optimizer": None})
    return record(arm, cfg, "in-process", rows, run_dir, time.perf_counter() - start), runtimes, arrays


# ----------------------------------------------------------------------------- pooled


def _tie(models: list[nn.Module], keys: list[str]) -> None:
    """Make ``keys`` of every model the very tensors of ``models[0]`` (pooled shared part)."""
    first = models[0]
    for other in models[1:]:
        for key in keys:
            path, _, name = key.rpartition(".")
            src, dst = first.get_submodule(path), other.get_submodule(path)
            if name in src._parameters:
                dst._parameters[name] = src._parameters[name]
            else:
                dst._buffers[name] = src._buffers[name]


def run_pooled(arm: str, cfg: FedConfig, run_dir: Path, local_roles: frozenset[str],
               train_sites: tuple[str, ...] | None = None, eval_sites: tuple[str, ...] | None = None,
               eval_every: int | None = None) -> tuple[dict[str, Any], dict[str, nn.Module]]:
    """Pooled (centralized) training: all sites' training data, one optimizer.

    Steps cycle over the sites (one batch of each in turn), ``local_steps`` per site per
    round, the same total as the federation. Tensors whose role is in ``local_roles`` are
    one copy per site (the oracle's site heads); everything else is one tensor for all.

    Returns:
        The run record and the per-site models (sharing their pooled tensors).
    """
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    start = time.perf_counter()
    device = pick_device(cfg.train.device)
    set_determinism(seed=cfg.seed)
    train_sites = train_sites or cfg.sites
    eval_sites = eval_sites or cfg.sites
    data = {}
    for s in dict.fromkeys((*train_sites, *eval_sites)):
        train_ds, val_ds, _ = build_datasets(load_site_config(cfg.site_config_path(s)), cfg.data, cfg.seed)
        data[s] = (data_loader(train_ds, cfg.data, train=True), val_ds, len(train_ds))
    torch.manual_seed(cfg.seed)
    base = build_model(cfg.model)
    policy = replace(get_policy("fedavg"), name=arm, local_roles=local_roles)
    shared, _ = split_keys(base, policy)
    models = {}
    for s in dict.fromkeys((*train_sites, *eval_sites)):
        torch.manual_seed(cfg.seed)
        models[s] = build_model(cfg.model)
    order = list(models)
    _tie([models[s] for s in order], shared)
    for m in models.values():
        m.to(device)
    params = list({id(p): p for m in models.values() for p in m.parameters()}.values())
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay) \
        if cfg.train.optimizer == "adamw" else make_optimizer(models[order[0]], cfg.train.optimizer,
                                                             cfg.train.lr, cfg.train.weight_decay)
    fed = cfg.federation
    every = eval_every or fed.eval_every
    total = fed.rounds * cfg.train.local_steps * len(train_sites)
    step = 0
    rows: list[dict] = []
    for rnd in range(1, fed.rounds + 1):
        t0 = time.perf_counter()
        losses = {s: [] for s in train_sites}
        for _ in range(cfg.train.local_steps):
            for s in train_sites:
                lr = scheduled_lr(cfg.train.lr, cfg.train.schedule, step, total)
                st = train_steps(models[s], data[s][0], optimizer, 1, device=device, lr=lr,
                                 amp=cfg.train.amp, progress=False)
                losses[s].append(st.loss)
                step += 1
        for s in train_sites:
            rows.append({"round": rnd, "phase": "train", "site": s, "train-loss": sum(losses[s]) / len(losses[s]),
                         "num-examples": float(data[s][2])})
        if rnd % every == 0 or rnd == fed.rounds:
            _fill_unseen(models, train_sites, eval_sites, shared)
            for s in eval_sites:
                out = evaluate(models[s], data[s][1], cfg.data.roi_size, device=device,
                               sw_batch_size=cfg.train.sw_batch_size, overlap=cfg.train.sw_overlap,
                               amp=cfg.train.amp)
                rows.append({"round": rnd, "phase": "eval", "site": s, **out})
        rows.append({"round": rnd, "phase": "round", "seconds": time.perf_counter() - t0,
                     "sites": len(train_sites)})
    with open(run_dir / "metrics.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    rec = record(arm, cfg, "in-process (pooled)", rows, run_dir, time.perf_counter() - start)
    return rec, models


def _fill_unseen(models: dict[str, nn.Module], train_sites: tuple[str, ...], eval_sites: tuple[str, ...],
                 shared: list[str]) -> None:
    """Give each evaluated site that did not train the mean of the trained sites' local tensors."""
    unseen = [s for s in eval_sites if s not in train_sites]
    if not unseen:
        return
    keys = [k for k in canonical_state(models[train_sites[0]]) if k not in set(shared)]
    if not keys:
        return
    mean = mean_local([{k: canonical_state(models[s])[k] for k in keys} for s in train_sites])
    for s in unseen:
        canon = canonical_state(models[s])
        with torch.no_grad():
            for k, v in mean.items():
                canon[k].copy_(v)


def mean_local(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of several sites' local tensors (integer buffers: the first site's)."""
    out = {}
    for k in parts[0]:
        ts = [p[k] for p in parts]
        out[k] = torch.stack([t.float() for t in ts]).mean(0).to(ts[0].dtype) \
            if ts[0].is_floating_point() else ts[0].clone()
    return out


# ----------------------------------------------------------------------------- LOSO


def run_loso(policy: str, cfg: FedConfig, held_out: str, run_dir: Path) -> dict[str, Any]:
    """Train a federation (in-process) on every site but ``held_out``; evaluate on ``held_out``.

    The unseen site's model is the final global shared part plus, for its local part
    (head, restore, norms, per policy), the element-wise mean of the trained sites' local
    tensors. It is evaluated on its own held-out (val split) cases only.
    """
    start = time.perf_counter()
    trained = tuple(s for s in cfg.sites if s != held_out)
    if policy == "centralized":
        rec, _ = run_pooled(f"loso-{policy}", cfg, run_dir, frozenset(), train_sites=trained,
                            eval_sites=(held_out,), eval_every=cfg.federation.rounds)
        dice = rec["final"].get(held_out, {})
    else:
        sub = replace(cfg, sites=trained, federation=replace(cfg.federation, min_sites=min(cfg.federation.min_sites,
                                                                                              len(trained))))
        rec, runtimes, arrays = run_inprocess(f"loso-{policy}", sub, run_dir, eval_every=cfg.federation.rounds)
        target = _runtimes(cfg, (held_out,))[held_out]
        target.load_global(arrays)
        parts = [rt.local_tensors() for rt in runtimes.values()]
        if parts and parts[0]:
            canon = canonical_state(target.model)
            with torch.no_grad():
                for k, v in mean_local(parts).items():
                    canon[k].copy_(v.to(canon[k].device))
        dice = target.evaluate(RoundSpec.from_fed(cfg, cfg.federation.rounds))
    return {"policy": policy, "held_out": held_out, "seed": cfg.seed, "trained_on": list(trained),
            "dice": {k: float(v) for k, v in dice.items() if k in summary.METRICS},
            "trained_sites_final": rec["final"], "wall_s": time.perf_counter() - start}


# ----------------------------------------------------------------------------- models back


def personalized_model(cfg: FedConfig, run_dir: Path, site: str) -> nn.Module:
    """A site's model at the end of a federated run: global shared arrays + its local state."""
    model = build_model(cfg.model)
    policy = get_policy(cfg.federation.policy)
    shared = load_payload(Path(run_dir) / "final_shared.ckpt")["arrays"]
    load_shared(model, shared, policy)
    local_path = Path(run_dir) / "local" / f"{site}.ckpt"
    if local_path.is_file():
        canon = canonical_state(model)
        with torch.no_grad():
            for k, v in load_payload(local_path)["local"].items():
                canon[k].copy_(v)
    return model.eval()


__all__ = ["ORACLE_LOCAL", "ProcessMonitor", "ensure_demo", "fedavg", "mean_local", "personalized_model",
           "record", "reset_state", "run_inprocess", "run_loso", "run_pooled", "run_simulated"]
