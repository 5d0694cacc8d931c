"""Pure summaries of benchmark runs: seed spread, convergence AUC, goals (no training here)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from uharmony_fed import REGIONS

METRICS = (*(f"dice-{r}" for r in REGIONS), "dice-mean")


def best_so_far(values: Sequence[float]) -> list[float]:
    """The running maximum of a curve (NaN entries carry the previous best, or 0)."""
    out, best = [], 0.0
    for v in values:
        if v is not None and math.isfinite(v):
            best = max(best, float(v))
        out.append(best)
    return out


def auc_rounds(values: Sequence[float]) -> float:
    """Area under the best-so-far curve against round, normalized to [0, 1].

    FeTS-style: the step function ``best(r)`` integrated over rounds 1..R and divided by
    R, so a run that reaches Dice d in round 1 and holds it scores d.
    """
    if not values:
        return float("nan")
    return float(np.mean(best_so_far(values)))


def auc_time(values: Sequence[float], seconds: Sequence[float]) -> float:
    """Area under the best-so-far curve against the run's own wall time, divided by it.

    The value a round reaches holds from that round's end on (0 before the first round
    ends), so time spent before any result counts against the run.
    """
    return auc_time_budget(values, seconds, float(sum(seconds)))


def auc_time_budget(values: Sequence[float], seconds: Sequence[float], budget: float) -> float:
    """Area under best-so-far Dice against time over ``[0, budget]``, divided by ``budget``.

    Before the first round finishes the best is 0; after the run ends its last best holds.
    """
    if budget <= 0 or not values or len(values) != len(seconds):
        return float("nan")
    best = best_so_far(values)
    ends = np.cumsum(seconds)
    area = 0.0
    for i, b in enumerate(best):
        # best[i] holds from the end of round i until the end of round i+1 (or the budget)
        start = min(float(ends[i]), budget)
        stop = min(float(ends[i + 1]) if i + 1 < len(best) else budget, budget)
        area += b * max(stop - start, 0.0)
    return float(area / budget)


def curve(rows: Iterable[Mapping[str, Any]], metric: str = "dice-mean") -> tuple[list[int], list[float], list[float]]:
    """Per-round mean over sites of ``metric`` and the round's seconds, from metrics rows.

    Returns:
        ``(rounds, values, seconds)``; rounds without an evaluation are left out, and a
        round's seconds are those of every round since the previous evaluated one.
    """
    per_round: dict[int, list[float]] = {}
    secs: dict[int, float] = {}
    for row in rows:
        if row.get("phase") == "eval" and metric in row:
            per_round.setdefault(int(row["round"]), []).append(float(row[metric]))
        elif row.get("phase") == "round":
            secs[int(row["round"])] = float(row["seconds"])
    rounds = sorted(per_round)
    values = [float(np.mean(per_round[r])) for r in rounds]
    seconds, prev = [], 0
    for r in rounds:
        seconds.append(sum(s for k, s in secs.items() if prev < k <= r))
        prev = r
    return rounds, values, seconds


def final_per_site(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Each site's eval metrics at the last evaluated round."""
    last: dict[str, tuple[int, dict[str, float]]] = {}
    for row in rows:
        if row.get("phase") == "eval":
            site, rnd = str(row["site"]), int(row["round"])
            if site not in last or rnd >= last[site][0]:
                last[site] = (rnd, {k: float(v) for k, v in row.items() if k in METRICS})
    return {s: m for s, (_, m) in sorted(last.items())}


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value) and count."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(np.mean(xs)), "std": float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0, "n": len(xs)}


def accuracy_table(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Seed spread of the final Dice per arm, site and region, and of the all-site mean.

    Args:
        runs: records with ``arm``, ``seed`` and ``final`` (``{site: {metric: value}}``).

    Returns:
        ``{arm: {"sites": {site: {metric: spread}}, "mean": spread of the mean over
        sites of dice-mean, "seeds": [...]}}`` in the order arms first appear.
    """
    out: dict[str, dict[str, Any]] = {}
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        sites = sorted({s for r in mine for s in r["final"]})
        table = {
            s: {m: spread([r["final"][s][m] for r in mine if s in r["final"] and m in r["final"][s]])
                for m in METRICS if any(m in r["final"].get(s, {}) for r in mine)}
            for s in sites
        }
        overall = [float(np.mean([r["final"][s]["dice-mean"] for s in r["final"]])) for r in mine if r["final"]]
        out[arm] = {"sites": table, "mean": spread(overall), "seeds": [r["seed"] for r in mine]}
    return out


def convergence_table(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """AUC of best-so-far mean Dice against round and against (simulated) wall time, per arm.

    ``auc_time`` uses each run's own duration; ``auc_time_common`` puts every run on one
    time axis, the longest run's duration (a slower arm is charged for its extra time).
    """
    out: dict[str, dict[str, Any]] = {}
    budget = max((sum(p["seconds"] for p in r["curve"]) for r in runs if r.get("curve")), default=0.0)
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == arm and r.get("curve")]
        by_round = [auc_rounds([p["dice"] for p in r["curve"]]) for r in mine]
        by_time = [auc_time([p["dice"] for p in r["curve"]], [p["seconds"] for p in r["curve"]]) for r in mine]
        secs = [sum(p["seconds"] for p in r["curve"]) for r in mine]
        common = [auc_time_budget([p["dice"] for p in r["curve"]], [p["seconds"] for p in r["curve"]], budget)
                  for r in mine]
        out[arm] = {"auc_round": spread(by_round), "auc_time": spread(by_time),
                    "auc_time_common": spread(common), "seconds": spread(secs)}
    return out


def goal(name: str, value: float, target: float, higher_is_better: bool = True, unit: str = "") -> dict[str, Any]:
    """One goal line: met when ``value`` is on the right side of ``target``."""
    if value is None or not math.isfinite(value):
        met = None
    else:
        met = value >= target if higher_is_better else value <= target
    return {"goal": name, "value": value, "target": target, "met": met, "unit": unit,
            "direction": ">=" if higher_is_better else "<="}


def accuracy_goals(acc: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The issue's accuracy goals as differences of mean Dice (in Dice points x100)."""
    def m(arm: str) -> float:
        return float(acc[arm]["mean"]["mean"]) if arm in acc else float("nan")

    u = m("uharmony")
    return [
        goal("uharmony - fedavg (Dice points)", 100 * (u - m("fedavg")), 3.0),
        goal("uharmony - fedbn (Dice points)", 100 * (u - m("fedbn")), 1.0),
        goal("uharmony - fedper (Dice points)", 100 * (u - m("fedper")), 1.0),
        goal("uharmony - centralized plain (Dice points)", 100 * (u - m("centralized")), 0.0),
        goal("uharmony - centralized oracle (Dice points)", 100 * (u - m("oracle")), -1.5),
    ]
