"""Cost measured side by side: layer time, round overhead, bytes, memory, inference, scaling."""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from uharmony_fed.fedconfig import FedConfig
from uharmony_fed.model import ModelConfig, build_model
from uharmony_fed.norm import UHarmonyNorm
from uharmony_fed.policy import POLICIES, canonical_state, plan, split_keys
from uharmony_fed.train import pick_device, predict_volume

from uharmony_fed.bench.arms import _runtimes, fedavg, run_simulated
from uharmony_fed.bench.settings import InferenceCost
from uharmony_fed.fed.wire import RoundSpec


def time_fwd_bwd(layer: nn.Module, shape: Sequence[int], min_run_s: float = 0.5,
                 device: torch.device | None = None) -> float:
    """Median seconds of one forward+backward of ``layer`` on a random tensor of ``shape``.

    Uses ``torch.utils.benchmark`` (warm-up, thread settings, CUDA synchronization).
    """
    from torch.utils import benchmark

    device = device or torch.device("cpu")
    layer = layer.to(device)
    x = torch.randn(*shape, device=device, requires_grad=True)

    def step() -> None:
        layer(x).sum().backward()

    step()  # warm-up (allocations, kernels)
    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return float(timer.blocked_autorange(min_run_time=min_run_s).median)


def layer_cost(sizes: Sequence[Sequence[int]], model_cfg: ModelConfig, min_run_s: float = 0.5,
               device: torch.device | None = None) -> list[dict[str, Any]]:
    """U-Harmony (the configured order/restore) vs ``InstanceNorm3d(affine=True)``, interleaved per size."""
    rows = []
    for shape in sizes:
        c = int(shape[1])
        uh = UHarmonyNorm(c, order=model_cfg.order, restore_order=model_cfg.restore_order,
                          restore=model_cfg.restore)
        inorm = nn.InstanceNorm3d(c, affine=True)
        t_in = time_fwd_bwd(inorm, shape, min_run_s, device)
        t_uh = time_fwd_bwd(uh, shape, min_run_s, device)
        t_in2 = time_fwd_bwd(inorm, shape, min_run_s, device)  # bracket U-Harmony against drift
        t_in = min(t_in, t_in2)
        rows.append({"shape": list(shape), "instancenorm_ms": 1e3 * t_in, "uharmony_ms": 1e3 * t_uh,
                     "ratio": t_uh / t_in})
    return rows


def array_record_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of the arrays' payload in a Flower ArrayRecord (as serialized on the wire)."""
    rec = ArrayRecord({k: v.detach().cpu().float().contiguous() for k, v in tensors.items()})
    return sum(len(rec[k].data) for k in rec)


def bytes_per_policy(model_cfg: ModelConfig) -> dict[str, dict[str, Any]]:
    """What one site sends per round under each federated policy: the plan and the ArrayRecord."""
    model = build_model(model_cfg)
    canon = canonical_state(model)
    out = {}
    for name, pol in POLICIES.items():
        if not pol.federated:
            continue
        shared, _ = split_keys(model, pol)
        p = plan(model, pol)
        out[name] = {"plan_bytes": p["bytes_per_round"], "record_bytes": array_record_bytes({k: canon[k] for k in shared}),
                     "shared_tensors": p["shared_tensors"], "local_params": p["local_params"]}
    ref = out["fedavg"]
    for row in out.values():
        row["plan_ratio"] = row["plan_bytes"] / ref["plan_bytes"]
        row["record_ratio"] = row["record_bytes"] / ref["record_bytes"]
    return out


def round_cost(cfg: FedConfig, run_dir: Path, timeout: float | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """A federated round (simulate) vs the same local steps of every site in one process.

    The federation evaluates only at its last round, so rounds 2..R-1 are pure training
    rounds; round 1 (Ray actors start, data are cached) and the startup before it are
    reported apart. In-process: each site's ``SiteRuntime.train_round`` in turn plus the
    FedAvg, after one warm-up round.
    """
    rounds = cfg.federation.rounds
    sim_cfg = replace(cfg, federation=replace(cfg.federation, eval_every=rounds))
    rec = run_simulated("round-cost", sim_cfg, run_dir, timeout=timeout)
    steady = rec["round_seconds"][1:-1] or rec["round_seconds"][:1]
    fed_round = sum(steady) / len(steady)
    log(f"  simulate: startup {rec['startup_s']:.1f} s, round 1 {rec['round_seconds'][0]:.1f} s, "
        f"steady round {fed_round:.1f} s")
    runtimes = _runtimes(cfg, cfg.sites)
    local_times = []
    for rnd in (1, 2):
        spec = RoundSpec.from_fed(cfg, rnd)
        t0 = time.perf_counter()
        updates = []
        for rt in runtimes.values():
            m = rt.train_round(spec)
            updates.append((rt.shared_tensors(), m["num-examples"]))
        fedavg(updates)
        local_times.append(time.perf_counter() - t0)
    local = local_times[-1]
    log(f"  in-process: warm-up round {local_times[0]:.1f} s, round {local:.1f} s")
    return {"simulate_total_s": rec["wall_s"], "startup_s": rec["startup_s"], "first_round_s": rec["round_seconds"][0],
            "federated_round_s": fed_round, "steady_rounds": len(steady), "inprocess_round_s": local,
            "inprocess_warmup_s": local_times[0], "ratio": fed_round / local, "peak_rss": rec["peak_rss"],
            "threads_inprocess": torch.get_num_threads(),
            "simulation": {"cpus_per_site": cfg.simulation.cpus_per_site,
                           "threads_per_site": cfg.simulation.threads_per_site},
            "local_steps": cfg.train.local_steps, "sites": len(cfg.sites)}


def site_memory(cfg: FedConfig) -> dict[str, float]:
    """Peak memory of one site's round in this process (ru_maxrss, and CUDA when used)."""
    device = pick_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rt = _runtimes(cfg, cfg.sites[:1])[cfg.sites[0]]
    rt.train_round(RoundSpec.from_fed(cfg, 1))
    out = {"process_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


class _TimeBound(Exception):
    pass


class _Counted(nn.Module):
    """Wraps a predictor: counts windows and stops once the time bound is passed."""

    def __init__(self, model: nn.Module, bound_s: float) -> None:
        super().__init__()
        self.model = model
        self.bound_s = bound_s
        self.windows = 0
        self.start = time.perf_counter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if time.perf_counter() - self.start > self.bound_s:
            raise _TimeBound
        out = self.model(x)
        self.windows += x.shape[0]
        return out


def count_windows(volume: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Sliding windows MONAI takes over ``volume`` (spatial) with ``roi`` and ``overlap``."""
    n = 1
    for size, r in zip(volume, roi):
        if r >= size:
            continue
        interval = max(int(r * (1 - overlap)), 1)
        n *= math.ceil((size - r) / interval) + 1
    return n


def inference_cost(icfg: InferenceCost, model_cfg: ModelConfig, device: torch.device) -> dict[str, Any]:
    """Sliding-window inference of one random BraTS-size volume with the full-size network.

    Stops at ``time_bound_s``; then the total is projected from the windows done.
    """
    mcfg = replace(model_cfg, features=tuple(icfg.features))
    model = build_model(mcfg).to(device).eval()
    image = torch.randn(1, *icfg.volume)
    total = count_windows(icfg.volume[1:], icfg.roi_size, icfg.overlap)
    wrapped = _Counted(model, icfg.time_bound_s)
    start = time.perf_counter()
    finished = True
    try:
        predict_volume(wrapped, image, icfg.roi_size, device=device, sw_batch_size=icfg.sw_batch_size,
                       overlap=icfg.overlap, amp=True)
    except _TimeBound:
        finished = False
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    per_window = seconds / max(wrapped.windows, 1)
    return {"volume": list(icfg.volume), "roi": list(icfg.roi_size), "features": list(icfg.features),
            "overlap": icfg.overlap, "sw_batch_size": icfg.sw_batch_size, "device": device.type,
            "windows_total": total, "windows_done": wrapped.windows, "finished": finished,
            "seconds": seconds, "seconds_per_window": per_window,
            "projected_s": seconds if finished else per_window * total,
            "params": sum(p.numel() for p in model.parameters())}


def scaling_run(cfg: FedConfig, n_sites: int, run_dir: Path, timeout: float | None = None) -> dict[str, Any]:
    """One tiny federation of ``n_sites`` simulated sites: round time and server memory."""
    rec = run_simulated(f"scale-{n_sites}", cfg, run_dir, timeout=timeout)
    return {"sites": n_sites, "wall_s": rec["wall_s"], "startup_s": rec["startup_s"],
            "round_seconds": rec["round_seconds"], "peak_rss_mb": {k: v / 2**20 for k, v in rec["peak_rss"].items()}}
