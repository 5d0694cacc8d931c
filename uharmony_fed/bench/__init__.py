"""``uharmony-fed bench``: accuracy, ablations, convergence and cost in one invocation."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path("configs/bench.yaml")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to the CLI's subparsers."""
    q = subparsers.add_parser(
        "bench", help="benchmark every sharing policy, the layer's ablations and the costs",
        description="Run the benchmark (accuracy per policy and seed, leave-one-site-out, ablations, "
        "convergence AUC, cost ratios) and write bench.json, bench.md and pictures.")
    q.add_argument("--config", default=str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None,
                   help="bench config YAML (default configs/bench.yaml if present, else the embedded one)")
    q.add_argument("--quick", action="store_true", help="the config's reduced 'quick:' sizes (<= 15 min on 2 cores)")
    q.add_argument("--out", default="bench_out", help="output folder (default bench_out)")
    return q


class Progress:
    """Prints which arm runs and the elapsed time."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, text: str) -> None:
        print(f"[bench {self.elapsed() / 60:5.1f} min] {text}", flush=True)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; return the exit code (0 also when some arms failed: they are reported)."""
    from uharmony_fed.bench.settings import load_bench_config

    cfg, raw = load_bench_config(args.config, quick=args.quick)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    result = run_bench(cfg, raw, out, quick=args.quick,
                       command=" ".join(["uharmony-fed bench", *(["--config", args.config] if args.config else []),
                                         *(["--quick"] if args.quick else []), "--out", args.out]))
    print(f"\nwrote {out / 'bench.md'} and {out / 'bench.json'} in {result['meta']['wall_s'] / 60:.1f} min")
    return 0


def _arm_cfg(cfg, arm: str, seed: int, extra: dict | None = None):
    from uharmony_fed.fedconfig import _merge

    over: dict[str, Any] = {"seed": seed, "name": f"bench-{arm}-s{seed}"}
    if arm == "centralized":
        over |= {"model": {"norm": "instance", "placement": "all"}, "federation": {"policy": "centralized"}}
    elif arm == "oracle":
        over |= {"federation": {"policy": "centralized"}}
    else:
        over |= {"federation": {"policy": arm}}
    return cfg.fed_config(_merge(over, extra or {}))


def run_bench(cfg, raw: dict, out: Path, quick: bool, command: str) -> dict[str, Any]:
    """Every part of the benchmark; a failing part is recorded and the others still run."""
    import torch

    from uharmony_fed.bench import arms, cost, summary
    from uharmony_fed.bench.report import plot_curves, plot_site_bars, write_markdown

    log = Progress()
    threads = cfg.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    errors: list[str] = []
    result: dict[str, Any] = {"runs": [], "loso": [], "cost": {}, "errors": errors}
    base = cfg.fed_config()
    arms.ensure_demo(base)
    runs_dir = out / "runs"

    def guarded(what: str, fn, *a, **k):
        try:
            return fn(*a, **k)
        except Exception as exc:  # one failing arm must not hide the others' numbers
            errors.append(f"{what}: {type(exc).__name__}: {exc}")
            log(f"FAILED {what}: {exc}")
            traceback.print_exc()
            return None

    # -- cheap costs first -------------------------------------------------------------
    log("cost: bytes per round per policy (plan and ArrayRecord)")
    result["cost"]["bytes"] = guarded("bytes", cost.bytes_per_policy, base.model)
    log("cost: U-Harmony vs InstanceNorm forward+backward")
    device = torch.device("cuda" if torch.cuda.is_available() and base.train.device != "cpu" else "cpu")
    result["cost"]["layer"] = guarded("layer timing", cost.layer_cost, cfg.cost.layer_sizes, base.model,
                                      cfg.cost.layer_min_run_s, device)

    # -- 1. accuracy ----------------------------------------------------------------------
    for i, seed in enumerate(cfg.seeds):
        for arm in (*cfg.policies, *cfg.references):
            acfg = _arm_cfg(cfg, arm, seed)
            run_dir = runs_dir / acfg.name
            if arm in ("centralized", "oracle"):
                log(f"accuracy: {arm} (pooled, in-process), seed {seed}")
                roles = frozenset() if arm == "centralized" else arms.ORACLE_LOCAL
                rec = guarded(f"{arm} seed {seed}", arms.run_pooled, arm, acfg, run_dir, roles)
                rec = rec[0] if rec else None
            elif i < cfg.simulate_seeds:
                log(f"accuracy: {arm} through simulate, seed {seed}")
                rec = guarded(f"{arm} seed {seed}", arms.run_simulated, arm, acfg, run_dir)
            else:
                log(f"accuracy: {arm} in-process federation, seed {seed}")
                rec = guarded(f"{arm} seed {seed}", arms.run_inprocess, arm, acfg, run_dir)
                rec = rec[0] if rec else None
            if rec:
                result["runs"].append(rec)
                log(f"  {arm} s{seed}: mean Dice {_mean_final(rec):.3f} ({rec['wall_s']:.0f} s)")

    # -- LOSO ----------------------------------------------------------------------------
    held = cfg.loso.sites or base.sites
    for seed in cfg.seeds[: cfg.loso.seeds]:
        for site in held:
            for policy in (*cfg.loso.policies, *(["centralized"] if cfg.loso.centralized else [])):
                log(f"leave-one-site-out: {policy} without {site}, seed {seed}")
                acfg = _arm_cfg(cfg, policy, seed, {"name": f"bench-loso-{policy}-{site}-s{seed}"})
                rec = guarded(f"loso {policy} {site}", arms.run_loso, policy, acfg, site,
                              runs_dir / f"loso-{policy}-{site}-s{seed}")
                if rec:
                    result["loso"].append(rec)
                    log(f"  {site} unseen: Dice {rec['dice'].get('dice-mean', float('nan')):.3f}")

    # -- 2. ablations -------------------------------------------------------------------
    ab = cfg.ablations
    names = [n for n in ab.variants if not ab.run or n in ab.run]
    ablations: dict[str, Any] = {}
    for name in names:
        over = dict(ab.variants[name])
        recs = []
        for seed in cfg.seeds[: ab.seeds]:
            extra = {"name": f"bench-ab-{name}-s{seed}", **over}
            if ab.rounds:
                extra = {**extra, "federation": {**extra.get("federation", {}), "rounds": ab.rounds}}
            log(f"ablation: {name} {over or '(default)'} seed {seed}, in-process federation ({ab.policy})")
            acfg = _arm_cfg(cfg, over.get("policy", ab.policy), seed,
                            {k: v for k, v in extra.items() if k != "policy"})
            rec = guarded(f"ablation {name}", arms.run_inprocess, name, acfg, runs_dir / acfg.name)
            if rec:
                recs.append(rec[0])
                log(f"  {name}: mean Dice {_mean_final(rec[0]):.3f} ({rec[0]['wall_s']:.0f} s)")
        if recs:
            table = summary.accuracy_table(recs)[name]
            ablations[name] = {"overrides": over, "mean": table["mean"], "seeds": table["seeds"],
                               "sites": table["sites"], "wall_s": sum(r["wall_s"] for r in recs) / len(recs)}
    result["ablations"] = ablations

    # -- 4. the remaining costs -----------------------------------------------------------
    rcfg = _arm_cfg(cfg, "uharmony", cfg.seeds[0], {"name": "bench-round-cost",
                                                    "federation": {"rounds": cfg.cost.round_rounds}})
    log(f"cost: federated round (simulate, {cfg.cost.round_rounds} rounds) vs the same local steps in-process")
    result["cost"]["round"] = guarded("round cost", cost.round_cost, rcfg, runs_dir / "round-cost", log=log)
    memory: dict[str, float] = {}
    if result["cost"]["round"]:
        memory |= {f"simulate {k}": v / 2**20 for k, v in result["cost"]["round"]["peak_rss"].items()}
    log("cost: peak memory of one site's round in this process")
    site_mem = guarded("site memory", cost.site_memory, rcfg)
    if site_mem:
        memory |= {f"bench process ({k})": v for k, v in site_mem.items()}
    result["cost"]["memory"] = memory
    sc = cfg.cost.scaling
    scaling = []
    for n in sc.sites:
        from uharmony_fed.fedconfig import _merge

        over = _merge(sc.overrides, {"seed": cfg.seeds[0], "name": f"bench-scale-{n}",
                                     "data_root": str(Path(base.data_root).with_name(f"{base.data_root.name}_scale{n}")),
                                     "sites": [_site_name(i) for i in range(n)],
                                     "demo": {"sites": n, "cases": sc.cases, "seed": 0},
                                     "federation": {"policy": "uharmony", "rounds": sc.rounds,
                                                    "min_sites": min(2, n)}})
        scfg = cfg.fed_config(over)
        log(f"cost: scaling, {n} simulated sites (tiny model, {sc.rounds} round)")
        row = guarded(f"scaling {n}", cost.scaling_run, scfg, n, runs_dir / f"scale-{n}")
        if row:
            scaling.append(row)
            log(f"  {n} sites: rounds {row['round_seconds']} s, server "
                f"{row['peak_rss_mb'].get('server (flwr-simulation)', float('nan')):.0f} MB")
    result["cost"]["scaling"] = scaling
    inf = cfg.cost.inference
    log(f"cost: sliding-window inference of a {inf.volume} volume (bound {inf.time_bound_s:.0f} s)")
    result["cost"]["inference"] = guarded("inference", cost.inference_cost, inf, base.model, device)

    # -- summaries, pictures, report -----------------------------------------------------
    acc = summary.accuracy_table(result["runs"])
    result["accuracy"] = acc
    result["convergence"] = summary.convergence_table(result["runs"])
    result["goals"] = _goals(result)
    result["loso_note"] = LOSO_NOTE
    result["ablation_note"] = (f"Each variant: in-process federation with policy {ab.policy}, "
                               f"{ab.seeds} seed(s), {ab.rounds or base.federation.rounds} rounds, the main "
                               "federation's data and steps; overrides apply to fed.yaml keys.")
    if ablations:
        best = max(ablations, key=lambda n: ablations[n]["mean"]["mean"])
        result["ablation_best"] = (f"Best measured variant: **{best}** "
                                   f"({100 * ablations[best]['mean']['mean']:.1f}); the configured default "
                                   f"({ablations.get('default', {}).get('mean', {}).get('mean', float('nan')) * 100:.1f}) "
                                   + ("is the best." if best == "default" else "is not the best measured."))
    pics_dir = out / "bench"
    pics_dir.mkdir(exist_ok=True)
    pictures: dict[str, str] = {}
    if result["runs"]:
        plot_curves(result["runs"], pics_dir / "dice_vs_round.png")
        plot_site_bars(acc, pics_dir / "site_dice.png")
        pictures |= {"curves": "bench/dice_vs_round.png", "site_bars": "bench/site_dice.png"}
    if cfg.overlay:
        fed_arms = [a for a in cfg.policies if a in acc]
        if fed_arms:
            ranked = sorted(fed_arms, key=lambda a: acc[a]["mean"]["mean"])
            for key, arm in (("overlay_best", ranked[-1]), ("overlay_worst", ranked[0])):
                log(f"overlay: {arm} ({key.split('_')[1]})")
                p = guarded(f"overlay {arm}", _overlay, cfg, result["runs"], arm, pics_dir / f"{key}.png")
                if p:
                    pictures[key] = f"bench/{p.name}"
    wall = log.elapsed()
    result["meta"] = {
        "command": command, "quick": quick, "wall_s": wall, "started": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                   f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
        "torch_threads": threads, "load_average_1_5_15": list(os.getloadavg()), "python": sys.version.split()[0], "torch": torch.__version__,
        "config_yaml": yaml.safe_dump(raw, sort_keys=False), "notes": _notes(cfg, quick, base),
        "goal_quick_minutes": 15, "met_time": (wall / 60 <= 15) if quick else (wall / 60 <= 90),
    }
    result["goals"].append(summary.goal(f"{'--quick' if quick else 'full'} wall time (min)", wall / 60,
                                        15 if quick else 90, higher_is_better=False))
    (out / "bench.json").write_text(json.dumps(_jsonable(result), indent=2))
    write_markdown(result, out / "bench.md", pictures)
    _print_headline(result, log)
    return result


LOSO_NOTE = ("Each federated model is trained (in-process federation, same code and steps) on every site "
             "but the held-out one, then evaluated on the held-out site's val cases. The unseen site's "
             "model is the final global shared part plus, for the part its policy keeps local (fedbn: "
             "norms and U-Harmony stages; fedper: head; uharmony: restore and head), the element-wise mean "
             "of the trained sites' local tensors. fedavg shares everything, so it needs no filling. "
             "centralized is pooled training on the other sites (plain InstanceNorm).")


def _site_name(i: int) -> str:
    from uharmony_fed.demo import site_name

    return site_name(i)


def _mean_final(rec: dict) -> float:
    vals = [m["dice-mean"] for m in rec["final"].values() if "dice-mean" in m]
    return sum(vals) / len(vals) if vals else float("nan")


def _goals(result: dict) -> list[dict]:
    from uharmony_fed.bench import summary

    goals = summary.accuracy_goals(result["accuracy"])
    c = result["cost"]
    if c.get("layer"):
        goals.append(summary.goal("U-Harmony / InstanceNorm time (worst size)", max(r["ratio"] for r in c["layer"]),
                                  1.15, higher_is_better=False, unit="x"))
    if c.get("round"):
        goals.append(summary.goal("federated round / in-process local steps", c["round"]["ratio"], 1.2,
                                  higher_is_better=False, unit="x"))
    if c.get("bytes"):
        goals.append(summary.goal("uharmony bytes per round / fedavg (ArrayRecord)",
                                  c["bytes"]["uharmony"]["record_ratio"], 1.0, higher_is_better=False, unit="x"))
    return goals


def _notes(cfg, quick: bool, base) -> list[str]:
    fed = base.federation
    notes = [
        f"Federation: {len(base.sites)} demo sites ({', '.join(base.sites)}), {base.demo.cases if base.demo else '?'} "
        f"cases each (val split {{:.0%}} held out per site), {fed.rounds} rounds x {base.train.local_steps} local "
        f"steps, roi {list(base.data.roi_size)}, spacing {list(base.data.spacing)} mm, DynUNet features "
        f"{list(base.model.features)}.".replace("{:.0%}", "about a third"),
        f"Seeds {list(cfg.seeds)}: the first {min(cfg.simulate_seeds, len(cfg.seeds))} through `simulate` (Flower "
        "simulation engine), the others through the in-process federation loop (the same SiteRuntime, "
        "initial arrays and example-weighted FedAvg, without Flower). Pooled references are in-process.",
        "Pooled references get the same total steps (sites x local steps per round, cycling over the sites' "
        "batches). centralized: plain InstanceNorm, one model. oracle: U-Harmony model, pooled training, a "
        "separate head and restore per site.",
    ]
    if quick:
        notes.append("--quick: reduced seeds, rounds, ablation set and sizes (see the config below); the accuracy "
                     "numbers are from a few minutes of CPU training on tiny volumes and are noisy. Ablations run "
                     f"{cfg.ablations.seeds} seed(s) in-process; LOSO {cfg.loso.seeds} seed(s) on "
                     f"{list(cfg.loso.sites) or 'every site'}; scaling {list(cfg.cost.scaling.sites)} sites; "
                     f"inference stops at {cfg.cost.inference.time_bound_s:.0f} s and projects.")
    return notes


def _overlay(cfg, runs: list[dict], arm: str, path: Path) -> Path | None:
    """Middle lesion slice of one val case per site: image, ground truth, prediction."""
    import numpy as np
    import torch

    from uharmony_fed.bench.arms import personalized_model
    from uharmony_fed.bench.report import plot_overlay
    from uharmony_fed.data import build_datasets, load_site_config
    from uharmony_fed.train import pick_device, predict_volume

    rec = next((r for r in runs if r["arm"] == arm and (Path(r["run_dir"]) / "final_shared.ckpt").is_file()), None)
    if rec is None:
        return None
    acfg = _arm_cfg(cfg, arm, rec["seed"])
    device = pick_device(acfg.train.device)
    panels = []
    for site in acfg.sites:
        model = personalized_model(acfg, Path(rec["run_dir"]), site).to(device)
        _, val_ds, _ = build_datasets(load_site_config(acfg.site_config_path(site)), acfg.data, acfg.seed)
        if len(val_ds) == 0:
            continue
        item = val_ds[0]
        prob = predict_volume(model, item["image"].unsqueeze(0), acfg.data.roi_size, device=device,
                              sw_batch_size=acfg.train.sw_batch_size, overlap=acfg.train.sw_overlap)[0].cpu()
        label = torch.as_tensor(item["label"]).float()
        pred = (prob > 0.5).float()
        z = int(np.argmax(label[2].sum((0, 1)).numpy())) if label[2].sum() > 0 else label.shape[-1] // 2
        ch = int(np.argmax(np.asarray(item["present"]))) if "present" in item else 0
        wt = label[2] > 0
        dice = float(2 * (pred[2][wt]).sum() / (pred[2].sum() + wt.sum()).clamp(min=1))
        panels.append({"site": site, "image": np.asarray(item["image"][3 if item["present"][3] else ch, :, :, z]),
                       "label": label[:, :, :, z].numpy(), "pred": pred[:, :, :, z].numpy(), "dice": dice})
    return plot_overlay(panels, f"{arm} ({rec['runtime']}, seed {rec['seed']}); colours: WT yellow, TC orange, "
                        "ET red (Dice: WT)", path)


def _print_headline(result: dict, log: Progress) -> None:
    from uharmony_fed.bench.report import goals_markdown

    print("\nmean Dice over sites (x100, mean ± sd over seeds):")
    for arm, a in result["accuracy"].items():
        m = a["mean"]
        print(f"  {arm:<12} {100 * m['mean']:6.1f} ± {100 * m['std']:.1f}  (n={m['n']})")
    print(goals_markdown(result["goals"]))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


__all__ = ["add_parser", "run", "run_bench"]
