"""The benchmark's report: bench.md tables and the pictures, from a result dict."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from uharmony_fed import REGIONS  # noqa: E402


def _pm(s: Mapping[str, Any] | None, scale: float = 100.0, digits: int = 1) -> str:
    if not s or s.get("n", 0) == 0 or not math.isfinite(s.get("mean", float("nan"))):
        return "-"
    if s["n"] > 1:
        return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"
    return f"{scale * s['mean']:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def accuracy_markdown(acc: Mapping[str, Mapping[str, Any]]) -> str:
    """Per-arm table: mean Dice over sites, then each site's ET/TC/WT/mean (x100, mean ± sd over seeds)."""
    sites = sorted({s for a in acc.values() for s in a["sites"]})
    header = ["arm", "seeds", "mean Dice"] + [f"{s} {r}" for s in sites for r in (*REGIONS, "mean")]
    rows = []
    for arm, a in acc.items():
        cells = [arm, len(a["seeds"]), f"**{_pm(a['mean'])}**"]
        for s in sites:
            site = a["sites"].get(s, {})
            cells += [_pm(site.get(f"dice-{r}")) for r in REGIONS] + [_pm(site.get("dice-mean"))]
        rows.append(cells)
    return _table(header, rows)


def goals_markdown(goals: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for g in goals:
        v = g["value"]
        val = f"{v:.3g}{g.get('unit', '')}" if v is not None and math.isfinite(v) else "n/a"
        met = {True: "met", False: "**not met**", None: "not measured"}[g["met"]]
        rows.append([g["goal"], val, f"{g['direction']} {g['target']}{g.get('unit', '')}", met])
    return _table(["goal", "measured", "target", "status"], rows)


def plot_curves(runs: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Mean Dice over sites against round, one line per arm (mean and range over seeds)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm in dict.fromkeys(r["arm"] for r in runs):
        curves = [r["curve"] for r in runs if r["arm"] == arm and r.get("curve")]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        xs = [p["round"] for p in curves[0][:n]]
        ys = np.array([[p["dice"] for p in c[:n]] for c in curves])
        ax.plot(xs, ys.mean(0), marker="o", label=arm, lw=2 if arm == "uharmony" else 1.2)
        if len(curves) > 1:
            ax.fill_between(xs, ys.min(0), ys.max(0), alpha=0.12)
    ax.set(xlabel="round", ylabel="mean Dice over sites", title="validation Dice against round", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_site_bars(acc: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Final mean Dice per site, one bar per arm (error bar: sd over seeds)."""
    arms = list(acc)
    sites = sorted({s for a in acc.values() for s in a["sites"]})
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(sites) * len(arms) / 3), 4.2))
    width = 0.8 / max(len(arms), 1)
    for j, arm in enumerate(arms):
        vals = [acc[arm]["sites"].get(s, {}).get("dice-mean", {}).get("mean", 0.0) for s in sites]
        errs = [acc[arm]["sites"].get(s, {}).get("dice-mean", {}).get("std", 0.0) for s in sites]
        xs = [i + (j - (len(arms) - 1) / 2) * width for i in range(len(sites))]
        ax.bar(xs, vals, width, yerr=errs, label=arm, capsize=2)
    ax.set_xticks(range(len(sites)), sites)
    ax.set(ylim=(0, 1), ylabel="Dice (mean of annotated regions)", title="final Dice per site")
    ax.legend(fontsize=7, ncol=4)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_overlay(panels: Sequence[Mapping[str, Any]], title: str, path: Path) -> Path:
    """Rows of (image slice, ground truth, prediction) per site.

    Args:
        panels: ``{"site", "image" (H, W), "label" (3, H, W), "pred" (3, H, W), "dice"}``.
    """
    fig, axes = plt.subplots(len(panels), 3, figsize=(7.5, 2.6 * len(panels)), squeeze=False)
    for row, p in zip(axes, panels):
        img = np.asarray(p["image"]).T
        for ax, (name, mask) in zip(row, (("image", None), ("ground truth", p["label"]), ("prediction", p["pred"]))):
            ax.imshow(img, cmap="gray", origin="lower")
            if mask is not None:
                rgba = np.zeros((*img.shape, 4))
                m = np.asarray(mask)
                for j, color in ((2, (1, 1, 0)), (1, (1, 0.4, 0)), (0, (1, 0, 0))):  # WT, TC, ET
                    sel = m[j].T > 0.5
                    rgba[sel, :3] = color
                    rgba[sel, 3] = 0.45
                ax.imshow(rgba, origin="lower")
            ax.set_axis_off()
            label = f"{p['site']}: {name}" if name != "prediction" else f"prediction (Dice {p['dice']:.2f})"
            ax.set_title(label, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(x: Any, digits: int = 2) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}f}" if math.isfinite(x) else "n/a"
    return str(x)


def write_markdown(result: Mapping[str, Any], path: Path, pictures: Mapping[str, str]) -> Path:
    """Write bench.md: command, config, tables, goals and links to the pictures."""
    meta = result["meta"]
    lines = [
        "# uharmony-fed benchmark",
        "",
        f"Command: `{meta['command']}`  ",
        f"Mode: **{'quick' if meta['quick'] else 'full'}**; wall time **{meta['wall_s'] / 60:.1f} min** "
        f"on {meta['machine']}; finished {meta['started']}"
        + (f"; load average at the end {', '.join(f'{x:.1f}' for x in meta['load_average_1_5_15'])} "
           "(other jobs share these cores)." if meta.get("load_average_1_5_15") else "."),
        "",
        "Dice is x100, mean ± sample sd over seeds; each site is scored on its own held-out (val split) "
        "cases with its personalized model (global shared part + its local part) at the last round. "
        "A site scores only the regions it annotates (hospitalC: WT only).",
        "",
        "## Goals",
        "",
        goals_markdown(result["goals"]),
        "",
    ]
    if meta.get("notes"):
        lines += ["## What this run is (and is not)", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    lines += ["## 1. Accuracy on the demo federation", "", accuracy_markdown(result["accuracy"]), ""]
    lines += ["Runtime per arm and seed: " + ", ".join(
        f"{r['arm']}/s{r['seed']}: {r['runtime']} ({r['wall_s']:.0f} s)" for r in result["runs"]), ""]
    for key, caption in (("curves", "Dice against round"), ("site_bars", "Dice per site"),
                         ("overlay_best", "best policy overlay"), ("overlay_worst", "worst policy overlay")):
        if key in pictures:
            lines += [f"![{caption}]({pictures[key]})", ""]
    if result.get("loso"):
        lines += ["### Leave-one-site-out", "", result["loso_note"], ""]
        rows = [[r["policy"], r["held_out"], r["seed"], ", ".join(r["trained_on"]),
                 _fmt(100 * r["dice"].get("dice-mean", float("nan")), 1),
                 " / ".join(_fmt(100 * r["dice"][f"dice-{g}"], 1) if f"dice-{g}" in r["dice"] else "-"
                            for g in REGIONS)] for r in result["loso"]]
        lines += [_table(["policy", "held-out site", "seed", "trained on", "Dice mean", "ET / TC / WT"], rows), ""]
    if result.get("ablations"):
        lines += ["## 2. Ablations of the layer and the backbone", "", result.get("ablation_note", ""), ""]
        rows = [[name, a["overrides"], _pm(a["mean"]), len(a["seeds"]), _fmt(a.get("wall_s", float("nan")), 0)]
                for name, a in result["ablations"].items()]
        lines += [_table(["variant", "overrides", "mean Dice", "seeds", "seconds"], rows), ""]
        if result.get("ablation_best"):
            lines += [result["ablation_best"], ""]
    conv = result.get("convergence", {})
    if conv:
        lines += ["## 3. Convergence (FeTS-style)", "",
                  "AUC of the best-so-far mean Dice: against round (normalized by the number of rounds), "
                  "against the run's own wall time (value of a round holds from its end on), and on one "
                  "common time axis (the longest run's duration; a slower arm pays for its time). "
                  "simulate wall time includes Flower's messaging; in-process arms have none.", ""]
        rows = [[arm, _pm(c["auc_round"]), _pm(c["auc_time"]), _pm(c["auc_time_common"]),
                 _fmt(c["seconds"]["mean"], 0)] for arm, c in conv.items()]
        lines += [_table(["arm", "AUC vs round", "AUC vs own time", "AUC vs common time", "round seconds (sum)"],
                         rows), ""]
    cost = result.get("cost", {})
    lines += ["## 4. Cost, measured side by side", ""]
    if cost.get("layer"):
        rows = [[" x ".join(map(str, r["shape"])), _fmt(r["instancenorm_ms"]), _fmt(r["uharmony_ms"]),
                 _fmt(r["ratio"])] for r in cost["layer"]]
        lines += ["Layer forward+backward (torch.utils.benchmark, median):", "",
                  _table(["feature map", "InstanceNorm ms", "U-Harmony ms", "ratio"], rows), ""]
    if cost.get("round"):
        rc = cost["round"]
        lines += ["Federated round vs the same local steps in one process "
                  f"({rc['sites']} sites x {rc['local_steps']} steps; simulate: "
                  f"{rc['simulation']['cpus_per_site']} CPU and {rc['simulation']['threads_per_site']} thread "
                  f"per site; in-process: {rc['threads_inprocess']} threads, sites in turn):", "",
                  _table(["simulate startup s", "round 1 s", "steady round s (mean of "
                          f"{rc['steady_rounds']})", "in-process round s", "ratio"],
                         [[_fmt(rc["startup_s"], 1), _fmt(rc["first_round_s"], 1), _fmt(rc["federated_round_s"], 1),
                           _fmt(rc["inprocess_round_s"], 1), _fmt(rc["ratio"])]]), ""]
    if cost.get("bytes"):
        rows = [[name, b["shared_tensors"], f"{b['plan_bytes']:,}", f"{b['record_bytes']:,}", _fmt(b["plan_ratio"]),
                 _fmt(b["record_ratio"])] for name, b in cost["bytes"].items()]
        lines += ["Bytes a site sends per round (plan: float32 shared params; measured: the ArrayRecord's "
                  "serialized arrays):", "",
                  _table(["policy", "tensors", "plan bytes", "ArrayRecord bytes", "plan / fedavg",
                          "record / fedavg"], rows), ""]
    if cost.get("memory"):
        mem = cost["memory"]
        rows = [[k, _fmt(v, 0)] for k, v in mem.items()]
        lines += ["Peak memory (MB):", "", _table(["process", "peak MB"], rows), ""]
    if cost.get("inference"):
        inf = cost["inference"]
        lines += [f"Sliding-window inference, one random {' x '.join(map(str, inf['volume']))} volume, DynUNet "
                  f"features {inf['features']} ({inf['params']:,} params), roi {inf['roi']}, overlap "
                  f"{inf['overlap']}, on {inf['device']}: {inf['windows_done']} of {inf['windows_total']} windows in "
                  f"{inf['seconds']:.1f} s ({inf['seconds_per_window']:.2f} s per window); "
                  + ("finished." if inf["finished"] else
                     f"stopped at the time bound; projected whole volume {inf['projected_s']:.0f} s."), ""]
    if cost.get("scaling"):
        rows = [[s["sites"], _fmt(s["wall_s"], 1), _fmt(s["startup_s"], 1),
                 " / ".join(_fmt(x, 1) for x in s["round_seconds"]),
                 _fmt(s["peak_rss_mb"].get("server (flwr-simulation)", float("nan")), 0),
                 _fmt(s["peak_rss_mb"].get("superlink", float("nan")), 0),
                 _fmt(s["peak_rss_mb"].get("site (ClientAppActor)", float("nan")), 0)] for s in cost["scaling"]]
        lines += ["Scaling (tiny model, simulate):", "",
                  _table(["sites", "wall s", "startup s", "round s", "server MB", "superlink MB",
                          "site actor MB"], rows), ""]
    if result.get("errors"):
        lines += ["## Errors", ""] + [f"- {e}" for e in result["errors"]] + [""]
    lines += ["## Config", "", "```yaml", meta["config_yaml"].rstrip(), "```", ""]
    path.write_text("\n".join(lines))
    return path
