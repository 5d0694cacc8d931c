"""Join benchmark: what a late-joining hospital gains, and what the old hospitals lose.

In-process (no Flower), with the same ``SiteRuntime`` code and example-weighted FedAvg of
the shared arrays as :func:`uharmony_fed.bench.arms.run_inprocess`, policy ``uharmony``:

1. the demo federation with the joiner (3 sites + ``hospitalNew``) under ``out/data``;
2. hospitalA/B/C train ``rounds_before`` rounds; their Dice ("before");
3. hospitalNew joins (its local part freshly initialized); all four train ``rounds_after``
   more rounds; old sites' Dice ("after") and the joiner's Dice;
4. local-only baseline for hospitalNew: ``rounds_after * local_steps`` steps alone;
5. a universal model of hospitalA/B/C (their restore and head behind the domain gate),
   evaluated on hospitalNew's val cases against the best single old-site model and the
   oracle (hospitalNew's own federated personalized model).

``python -m uharmony_fed.bench.join --out DIR`` writes ``DIR/join.json`` and ``DIR/join_bench.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from uharmony_fed.bench.arms import _runtimes, reset_state, train_and_average
from uharmony_fed.fed.server_loop import initial_shared_arrays
from uharmony_fed.fed.site_runtime import SiteRuntime
from uharmony_fed.fed.wire import RoundSpec
from uharmony_fed.fedconfig import FedConfig, load_config
from uharmony_fed.policy import canonical_state
from uharmony_fed.train import evaluate

OLD_SITES = ("hospitalA", "hospitalB", "hospitalC")
JOINER = "hospitalNew"
CASES = 6

#: The sizes of configs/bench.yaml's ``fed:`` section.
FED_OVERRIDES: dict[str, Any] = {
    "model": {"features": [8, 16, 32], "order": 2, "restore_order": 1, "restore": "poly", "placement": "all"},
    "data": {"spacing": [4.0, 4.0, 4.0], "roi_size": [24, 24, 24], "batch_size": 1, "samples_per_case": 2},
    "train": {"local_steps": 10, "lr": 0.01, "schedule": "cosine"},
    "federation": {"policy": "uharmony", "eval_every": 1, "wait_for_sites_s": 60.0},
}

#: Goals (Dice points, i.e. Dice x 100).
GOAL_NEW_GAIN = 5.0
GOAL_OLD_MAX_DROP = 1.0
GOAL_ORACLE_GAP = 2.0

REGION_KEYS = ("dice-ET", "dice-TC", "dice-WT", "dice-mean")


def make_config(out: Path, rounds: int, seed: int, sites: tuple[str, ...], name: str = "join-bench",
                policy: str = "uharmony") -> FedConfig:
    """The bench-size federation over ``sites`` of the demo under ``out/data``."""
    over = json.loads(json.dumps(FED_OVERRIDES))
    over.update({"name": name, "data_root": str(out / "data"), "sites": list(sites), "seed": seed})
    over["federation"].update({"rounds": rounds, "policy": policy, "min_sites": min(len(sites), 2)})
    return load_config(None, over)


def _dice(m: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in m.items() if k in REGION_KEYS}


def _eval_on(model: torch.nn.Module, rt: SiteRuntime, spec: RoundSpec) -> dict[str, float]:
    """Dice of ``model`` on site ``rt``'s val split (the metrics of ``uharmony_fed.train.evaluate``)."""
    return _dice(evaluate(model, rt.val_ds, spec.data.roi_size, device=rt.device,
                          sw_batch_size=spec.train.sw_batch_size, overlap=spec.train.sw_overlap,
                          amp=spec.train.amp))


def _eval_universal(um: torch.nn.Module, rt: SiteRuntime, spec: RoundSpec) -> tuple[dict[str, float], list]:
    """Per-case gate on the whole volume, fixed for the sliding window; Dice per region over cases."""
    from uharmony_fed.universal import GatedPredictor

    scores: dict[str, list[float]] = {}
    gates = []
    for item in rt.val_ds:
        with torch.no_grad():
            gate = um.gate(torch.as_tensor(item["image"]).float()[None].to(rt.device))[0]
        gates.append([round(float(g), 4) for g in gate])
        out = evaluate(GatedPredictor(um, gate).eval(), [item], spec.data.roi_size, device=rt.device,
                       sw_batch_size=spec.train.sw_batch_size, overlap=spec.train.sw_overlap, amp=spec.train.amp)
        for k in ("dice-ET", "dice-TC", "dice-WT"):
            if k in out:
                scores.setdefault(k, []).append(float(out[k]))
    res = {k: sum(v) / len(v) for k, v in scores.items()}
    if res:
        res["dice-mean"] = sum(res.values()) / len(res)
    return res, gates


def _universal(cfg: FedConfig, arrays: dict[str, torch.Tensor], runtimes: dict[str, SiteRuntime]) -> torch.nn.Module:
    """The universal model of ``runtimes`` built in memory, as ``export_site`` + ``assemble`` would."""
    from uharmony_fed.universal import UniversalModel, _site_training_images, export_keys, site_descriptor

    sites = []
    for name, rt in runtimes.items():
        rt.load_global(arrays)
        canon = canonical_state(rt.model)
        params = {k: canon[k].detach().cpu().clone() for k in export_keys(rt.model)}
        images = _site_training_images(rt.site, cfg.data, cfg.seed)
        desc = site_descriptor(rt.model, images, rt.device)
        sites.append({"site": name, "params": params, "descriptor": desc.to_dict()})
    um = UniversalModel(cfg.model, arrays, sites, policy=cfg.federation.policy)
    return um.to(next(iter(runtimes.values())).device).eval()


def run_join_bench(out: Path, rounds_before: int = 4, rounds_after: int = 4, seed: int = 0,
                   universal: bool = True, control_run: bool = True, log: Any = print) -> dict[str, Any]:
    """Run the join benchmark (see the module docstring); write ``out/join.json``."""
    from uharmony_fed.demo import make_demo

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not (out / "data" / JOINER / "site.yaml").is_file():
        make_demo(out / "data", sites=3, cases=CASES, seed=0, joiner=True, log=None)
    total = rounds_before + rounds_after
    cfg = make_config(out, total, seed, (*OLD_SITES, JOINER))
    reset_state(cfg)
    timings: dict[str, float] = {}

    # -- phase 1: the old federation ---------------------------------------------------
    t0 = time.perf_counter()
    runtimes = _runtimes(cfg, OLD_SITES)
    arrays = initial_shared_arrays(cfg)
    curve: list[dict[str, Any]] = []

    def one_round(rnd: int, evaluate_now: bool) -> dict[str, dict[str, float]]:
        nonlocal arrays
        spec = RoundSpec.from_fed(cfg, rnd)
        arrays, _ = train_and_average(runtimes, arrays, spec)
        res = {}
        if evaluate_now:
            for site, rt in runtimes.items():
                rt.load_global(arrays)
                res[site] = _dice(rt.evaluate(spec))
            curve.append({"round": rnd, "sites": res})
            log(f"round {rnd}: " + ", ".join(f"{s} {d.get('dice-mean', float('nan')):.3f}" for s, d in res.items()))
        return res

    before: dict[str, dict[str, float]] = {}
    for rnd in range(1, rounds_before + 1):
        before = one_round(rnd, True)
    timings["phase1_s"] = time.perf_counter() - t0

    # -- phase 2: hospitalNew joins --------------------------------------------------
    t0 = time.perf_counter()
    runtimes[JOINER] = SiteRuntime(_load_site(cfg, JOINER), RoundSpec.from_fed(cfg, rounds_before + 1))
    after: dict[str, dict[str, float]] = {}
    for rnd in range(rounds_before + 1, total + 1):
        after = one_round(rnd, True)
    timings["phase2_s"] = time.perf_counter() - t0
    final_spec = RoundSpec.from_fed(cfg, total)

    # -- control: the old federation continues without the joiner --------------------
    control: dict[str, Any] | None = None
    if control_run:
        t0 = time.perf_counter()
        control = _old_only_control(cfg, rounds_before, total, seed)
        timings["control_s"] = time.perf_counter() - t0
        log("control (no joiner): " + ", ".join(f"{s} {d.get('dice-mean', float('nan')):.3f}"
                                                for s, d in control["after"].items()))

    # -- local-only baseline for hospitalNew ------------------------------------------
    t0 = time.perf_counter()
    lcfg = make_config(out, rounds_after, seed, (JOINER,), name="join-bench-local", policy="local-only")
    reset_state(lcfg)
    lrt = _runtimes(lcfg, (JOINER,))[JOINER]
    for rnd in range(1, rounds_after + 1):
        lrt.train_round(RoundSpec.from_fed(lcfg, rnd))
    local_only = _dice(lrt.evaluate(RoundSpec.from_fed(lcfg, rounds_after)))
    timings["local_only_s"] = time.perf_counter() - t0
    log(f"local-only {JOINER}: {local_only.get('dice-mean', float('nan')):.3f}")

    # -- universal model vs single sites vs oracle ------------------------------------
    uni: dict[str, Any] | None = None
    if universal:
        t0 = time.perf_counter()
        new_rt = runtimes[JOINER]
        single = {}
        for site in OLD_SITES:
            runtimes[site].load_global(arrays)
            single[site] = _eval_on(runtimes[site].model, new_rt, final_spec)
        new_rt.load_global(arrays)
        oracle = _eval_on(new_rt.model, new_rt, final_spec)
        um = _universal(cfg, arrays, {s: runtimes[s] for s in OLD_SITES})
        u_old, gates_old = _eval_universal(um, new_rt, final_spec)
        um_all = _universal(cfg, arrays, {s: runtimes[s] for s in (*OLD_SITES, JOINER)})
        u_all, gates_all = _eval_universal(um_all, new_rt, final_spec)
        uni = {"single_site": single, "oracle": oracle, "universal_abc": u_old, "gates_abc": gates_old,
               "universal_abcn": u_all, "gates_abcn": gates_all, "val_cases": len(new_rt.val_ds)}
        timings["universal_s"] = time.perf_counter() - t0

    result = {
        "seed": seed, "rounds_before": rounds_before, "rounds_after": rounds_after,
        "local_steps": cfg.train.local_steps, "cases_per_site": CASES, "policy": cfg.federation.policy,
        "sizes": {"features": list(cfg.model.features), "roi_size": list(cfg.data.roi_size),
                  "batch_size": cfg.data.batch_size, "samples_per_case": cfg.data.samples_per_case,
                  "spacing": list(cfg.data.spacing)},
        "val_cases": {s: len(rt.val_ds) for s, rt in runtimes.items()},
        "before": before, "after": after, "joiner": after.get(JOINER, {}), "local_only": local_only,
        "control_no_joiner": control,
        "universal": uni, "curve": curve, "timings": timings,
        "wall_s": time.perf_counter() - start,
    }
    result["goals"] = goals(result)
    (out / "join.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _old_only_control(cfg: FedConfig, rounds_before: int, total: int, seed: int) -> dict[str, Any]:
    """hospitalA/B/C alone for all ``total`` rounds (same seed and schedule): what "after" would be without the join."""
    from monai.utils import set_determinism

    runtimes = _runtimes(cfg, OLD_SITES)
    arrays = initial_shared_arrays(cfg)
    out: dict[str, Any] = {}
    for rnd in range(1, total + 1):
        if rnd == rounds_before + 1:
            set_determinism(seed=seed)  # as building the joiner's runtime does in the main arm
        spec = RoundSpec.from_fed(cfg, rnd)
        arrays, _ = train_and_average(runtimes, arrays, spec)
        if rnd in (rounds_before, total):
            res = {}
            for site, rt in runtimes.items():
                rt.load_global(arrays)
                res[site] = _dice(rt.evaluate(spec))
            out["before" if rnd == rounds_before else "after"] = res
    return out


def _load_site(cfg: FedConfig, site: str):  # noqa: ANN202
    from uharmony_fed.data import load_site_config

    return load_site_config(cfg.site_config_path(site))


# ----------------------------------------------------------------------------- report


def _pts(d: dict[str, float] | None) -> float | None:
    if not d or "dice-mean" not in d:
        return None
    return 100.0 * float(d["dice-mean"])


def goals(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each goal's figures (Dice points) and whether it is met (``None``: not measured)."""
    out: dict[str, dict[str, Any]] = {}
    new, loc = _pts(r.get("joiner")), _pts(r.get("local_only"))
    gain = None if new is None or loc is None else new - loc
    out["new_vs_local"] = {"gain": gain, "met": None if gain is None else gain >= GOAL_NEW_GAIN}
    drops = {}
    for s, b in (r.get("before") or {}).items():
        a = (r.get("after") or {}).get(s)
        if _pts(b) is not None and _pts(a) is not None:
            drops[s] = _pts(b) - _pts(a)  # type: ignore[operator]
    worst = max(drops.values()) if drops else None
    out["old_no_drop"] = {"drop": drops, "worst_drop": worst,
                          "met": None if worst is None else worst <= GOAL_OLD_MAX_DROP}
    ctrl = (r.get("control_no_joiner") or {}).get("after") or {}
    cost = {}
    for s, c in ctrl.items():
        a = (r.get("after") or {}).get(s)
        if _pts(c) is not None and _pts(a) is not None:
            cost[s] = _pts(c) - _pts(a)  # type: ignore[operator]
    worst_c = max(cost.values()) if cost else None
    out["old_vs_control"] = {"drop": cost, "worst_drop": worst_c,
                             "met": None if worst_c is None else worst_c <= GOAL_OLD_MAX_DROP}
    uni = r.get("universal")
    if uni:
        u, o = _pts(uni.get("universal_abc")), _pts(uni.get("oracle"))
        singles = [p for p in (_pts(d) for d in uni.get("single_site", {}).values()) if p is not None]
        best = max(singles) if singles else None
        gap = None if u is None or o is None else o - u
        above = None if u is None or best is None else u > best
        out["universal"] = {"gap_to_oracle": gap, "margin_over_best_single": None if above is None else u - best,
                            "met": None if gap is None or above is None else (gap <= GOAL_ORACLE_GAP and above)}
    else:
        out["universal"] = {"met": None}
    return out


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _met(m: bool | None) -> str:
    return "not measured" if m is None else ("**met**" if m else "**not met**")


def format_markdown(r: dict[str, Any], command: str = "python -m uharmony_fed.bench.join --out DIR") -> str:
    """The short report of one run (Dice in points, i.e. x100)."""
    g = r.get("goals") or goals(r)
    sz = r.get("sizes", {})
    lines = [
        "# Join benchmark (a hospital joins a running U-Harmony federation)",
        "",
        f"**One seed ({r.get('seed')}) and small sizes: an indication, not a result.** "
        f"Demo data, {r.get('cases_per_site')} cases per site (val cases: "
        + ", ".join(f"{s} {n}" for s, n in (r.get("val_cases") or {}).items()) + "); "
        f"features {sz.get('features')}, roi {sz.get('roi_size')}, batch {sz.get('batch_size')}, "
        f"samples/case {sz.get('samples_per_case')}, spacing {sz.get('spacing')} mm; "
        f"policy {r.get('policy')}, {r.get('local_steps')} local steps per round, "
        f"{r.get('rounds_before')} rounds of hospitalA/B/C, then {r.get('rounds_after')} rounds of all four; "
        f"in-process (SiteRuntime + example-weighted FedAvg, no Flower).",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {r.get('wall_s', 0.0):.0f} s on 2 CPU cores "
        + "(" + ", ".join(f"{k} {v:.0f} s" for k, v in (r.get("timings") or {}).items()) + ").",
        "",
        "Dice-mean over the site's annotated regions on its val split, in points.",
        "",
        "| Comparison | Figures | Goal | Status |",
        "|---|---|---|---|",
    ]
    gn = g["new_vs_local"]
    lines.append(f"| hospitalNew: federated vs local-only | {_f(_pts(r.get('joiner')))} vs "
                 f"{_f(_pts(r.get('local_only')))} (gain {_f(gn['gain'])}) | gain >= +{GOAL_NEW_GAIN:.0f} | "
                 f"{_met(gn['met'])} |")
    go = g["old_no_drop"]
    parts = []
    for s, b in (r.get("before") or {}).items():
        parts.append(f"{s} {_f(_pts(b))} -> {_f(_pts((r.get('after') or {}).get(s)))}")
    lines.append(f"| old sites before -> after the join | {'; '.join(parts) or 'n/a'} (worst drop "
                 f"{_f(go['worst_drop'])}) | no drop > {GOAL_OLD_MAX_DROP:.0f} | {_met(go['met'])} |")
    ctrl = (r.get("control_no_joiner") or {}).get("after")
    if ctrl:
        gc = g["old_vs_control"]
        parts = [f"{s} {_f(_pts((r.get('after') or {}).get(s)))} vs {_f(_pts(c))}" for s, c in ctrl.items()]
        lines.append(f"| old sites after: with the joiner vs without it (control) | {'; '.join(parts)} "
                     f"(worst drop {_f(gc['worst_drop'])}) | no drop > {GOAL_OLD_MAX_DROP:.0f} | {_met(gc['met'])} |")
    uni = r.get("universal")
    gu = g["universal"]
    if uni:
        singles = "; ".join(f"{s} {_f(_pts(d))}" for s, d in uni.get("single_site", {}).items())
        lines.append(f"| on hospitalNew: universal(A,B,C) vs single old sites vs oracle | "
                     f"{_f(_pts(uni.get('universal_abc')))} vs [{singles}] vs {_f(_pts(uni.get('oracle')))} "
                     f"(gap to oracle {_f(gu['gap_to_oracle'])}) | within {GOAL_ORACLE_GAP:.0f} of oracle, "
                     f"above every single site | {_met(gu['met'])} |")
        if uni.get("universal_abcn") is not None:
            lines.append(f"| (extra) universal(A,B,C,New) on hospitalNew | "
                         f"{_f(_pts(uni.get('universal_abcn')))} | - | - |")
    else:
        lines.append("| universal vs single site vs oracle | skipped | within 2 of oracle | not measured |")
    lines.append("")
    if uni:
        lines += [
            "Universal: the federation's final shared arrays with hospitalA/B/C's restore and head behind "
            "the domain gate (built in memory as `export_site` + `assemble` would); gate computed per case on "
            "the whole volume, then a fixed-gate sliding window (`GatedPredictor`). hospitalNew is unseen by "
            "the gate. Oracle: hospitalNew's own federated personalized model. Single site: the global "
            "shared arrays with one old site's restore and head.",
            "",
            f"Gate weights over (A, B, C) per val case: {uni.get('gates_abc')}; over (A, B, C, New): "
            f"{uni.get('gates_abcn')}.",
            "",
        ]
    if ctrl:
        same = (r.get("control_no_joiner") or {}).get("before") == r.get("before")
        lines += [
            "Control: hospitalA/B/C alone for all rounds, same seed and schedule (the federation is still "
            "improving at this size, so before -> after mostly shows further training; with vs without the "
            "joiner is the cleaner view of what the join costs the old sites). The control's Dice after "
            f"round {r.get('rounds_before')} {'equals' if same else 'differs from'} the main arm's \"before\" "
            "(identical up to the join)" + (" exactly." if same else "."),
            "",
        ]
    lines += [
        "With 2 val cases per site, one seed and 8 short rounds, Dice moves several points from round to "
        "round (see `curve` in the JSON); differences of a few points are within that noise.",
        "",
    ]
    lines += [
        "Local-only baseline: hospitalNew alone, the same number of steps (rounds_after x local_steps), "
        "same seed, its own cosine schedule over those steps. The joiner inside the federation follows the "
        "federation's schedule from the round it joins (lower learning rate).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m uharmony_fed.bench.join", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rounds-before", type=int, default=4)
    p.add_argument("--rounds-after", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-universal", action="store_true")
    p.add_argument("--no-control", action="store_true", help="skip the old-sites-without-joiner control")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    r = run_join_bench(a.out, a.rounds_before, a.rounds_after, a.seed, universal=not a.no_universal,
                       control_run=not a.no_control)
    cmd = f"python -m uharmony_fed.bench.join --out {a.out}"
    if (a.rounds_before, a.rounds_after, a.seed) != (4, 4, 0):
        cmd += f" --rounds-before {a.rounds_before} --rounds-after {a.rounds_after} --seed {a.seed}"
    md = format_markdown(r, cmd)
    (Path(a.out) / "join_bench.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()


__all__ = ["format_markdown", "goals", "main", "make_config", "run_join_bench"]
