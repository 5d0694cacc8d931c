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
   oracle (hospitalNew's own federated personalized model); next to the gate, two
   reference arms: uniform mixing and the plain softmax gate (no unseen-scanner fallback).

``python -m uharmony_fed.bench.join --out DIR`` writes ``DIR/join.json`` and ``DIR/join_bench.md``;
``--seeds 0 1 2`` runs each seed (``DIR/join_seed<N>.json``) and writes the spread over
seeds to ``DIR/join_seeds.json``, ``DIR/join_seeds.md`` and ``DIR/join_seeds.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from uharmony_fed import REGIONS
from uharmony_fed.bench.arms import _runtimes, reset_state, train_and_average
from uharmony_fed.fed.server_loop import initial_shared_arrays
from uharmony_fed.fed.site_runtime import SiteRuntime
from uharmony_fed.fed.wire import RoundSpec
from uharmony_fed.fedconfig import FedConfig, load_config
from uharmony_fed.policy import canonical_state
from uharmony_fed.train import evaluate, predict_volume

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


def make_config(out: Path, rounds: int, seed: int, sites: tuple[str, ...], name: str = "join-bench",
                policy: str = "uharmony", warmup: int | None = None) -> FedConfig:
    """The bench-size federation over ``sites`` of the demo under ``out/data``.

    ``warmup``: ``train.join_warmup_rounds`` (``None``: the product's default).
    """
    over = json.loads(json.dumps(FED_OVERRIDES))
    if warmup is not None:
        over["train"]["join_warmup_rounds"] = warmup
    over.update({"name": name, "data_root": str(out / "data"), "sites": list(sites), "seed": seed})
    over["federation"].update({"rounds": rounds, "policy": policy, "min_sites": min(len(sites), 2)})
    return load_config(None, over)


def _dice(m: dict[str, float]) -> dict[str, float]:
    """The Dice entries: the regions', their mean and a site's extra classes' (``dice-RC``)."""
    return {k: float(v) for k, v in m.items() if k.startswith("dice-")}


def _eval_on(model: torch.nn.Module, rt: SiteRuntime, spec: RoundSpec) -> dict[str, float]:
    """Dice of ``model`` on site ``rt``'s val split (the metrics of ``uharmony_fed.train.evaluate``)."""
    return _dice(evaluate(model, rt.val_ds, spec.data.roi_size, device=rt.device,
                          sw_batch_size=spec.train.sw_batch_size, overlap=spec.train.sw_overlap,
                          amp=spec.train.amp))


#: The universal model's gate arms: its gate, and two references (uniform mixing, the plain softmax).
def _most_confident(um: Any, x: torch.Tensor, roi_size: Sequence[int]) -> torch.Tensor:
    """A label-free per-case pick: the site whose own whole-tumour prediction of ``x`` is most decided.

    Confidence is the mean of ``|2 p_WT - 1|`` over the head (the voxels where any sequence
    is non-zero); the site with the highest gets weight 1. Costs one sliding window per site.
    """
    from uharmony_fed.universal import GatedPredictor

    head = x.abs().sum(1)[0] > 0
    conf = []
    for s in range(len(um.site_names)):
        onehot = torch.zeros(len(um.site_names), device=x.device)
        onehot[s] = 1.0
        p = predict_volume(GatedPredictor(um, onehot).eval(), x, roi_size, device=x.device)
        conf.append(float((2.0 * p[0, REGIONS.index("WT")] - 1.0).abs()[head].mean()))
    pick = torch.zeros(len(um.site_names), device=x.device)
    pick[max(range(len(conf)), key=conf.__getitem__)] = 1.0
    return pick


GATE_ARMS: dict[str, Callable[[Any, torch.Tensor, Sequence[int]], torch.Tensor]] = {
    "gate": lambda um, x, roi: um.gate(x)[0],
    "uniform": lambda um, x, roi: torch.full((len(um.site_names),), 1.0 / len(um.site_names), device=x.device),
    "sharp": lambda um, x, roi: um.gate(x, fallback=False)[0],
    "confident": _most_confident,
}


def _eval_universal(um: Any, rt: SiteRuntime, spec: RoundSpec, arm: str = "gate") -> tuple[dict[str, float], list]:
    """Per-case gate (``GATE_ARMS[arm]``) on the whole volume, fixed for the sliding window; Dice per region."""
    from uharmony_fed.universal import GatedPredictor

    scores: dict[str, list[float]] = {}
    gates = []
    for item in rt.val_ds:
        with torch.no_grad():
            gate = GATE_ARMS[arm](um, torch.as_tensor(item["image"]).float()[None].to(rt.device),
                                  spec.data.roi_size)
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


def _gate_check(um: Any, runtimes: dict[str, SiteRuntime]) -> dict[str, dict[str, list[float]]]:
    """Per site's val cases: ``um.outside``, and the weight on the site itself with and without the fallback.

    The weights are ``None`` for a site not in ``um``.
    """
    out = {}
    for name, rt in runtimes.items():
        own, own_sharp, far = [], [], []
        for item in rt.val_ds:
            x = torch.as_tensor(item["image"]).float()[None].to(rt.device)
            with torch.no_grad():
                if name in um.site_names:
                    s = um.site_names.index(name)
                    own.append(round(float(um.gate(x)[0, s]), 4))
                    own_sharp.append(round(float(um.gate(x, fallback=False)[0, s]), 4))
                far.append(round(float(um.outside(x)[0]), 3))
        out[name] = {"own_weight": own or None, "own_weight_sharp": own_sharp or None, "outside": far}
    return out


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
                   universal: bool = True, control_run: bool = True, log: Any = print,
                   json_name: str = "join.json", warmup: int | None = None) -> dict[str, Any]:
    """Run the join benchmark (see the module docstring); write ``out/<json_name>``."""
    from uharmony_fed.demo import make_demo

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not (out / "data" / JOINER / "site.yaml").is_file():
        make_demo(out / "data", sites=3, cases=CASES, seed=0, joiner=True, log=None)
    total = rounds_before + rounds_after
    cfg = make_config(out, total, seed, (*OLD_SITES, JOINER), warmup=warmup)
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
        uni = {"single_site": single, "oracle": oracle, "radii": [round(float(r), 3) for r in um.gate_radii],
               "gate_check": _gate_check(um, runtimes)}
        for arm in GATE_ARMS:
            suffix = "" if arm == "gate" else f"_{arm}"
            uni[f"universal_abc{suffix}"], gates = _eval_universal(um, new_rt, final_spec, arm)
            if arm != "uniform":
                uni[f"gates_abc{suffix}"] = gates
        um_all = _universal(cfg, arrays, {s: runtimes[s] for s in (*OLD_SITES, JOINER)})
        uni["universal_abcn"], uni["gates_abcn"] = _eval_universal(um_all, new_rt, final_spec)
        uni["val_cases"] = len(new_rt.val_ds)
        timings["universal_s"] = time.perf_counter() - t0

    result = {
        "seed": seed, "rounds_before": rounds_before, "rounds_after": rounds_after,
        "local_steps": cfg.train.local_steps, "cases_per_site": CASES, "policy": cfg.federation.policy,
        "join_warmup_rounds": cfg.train.join_warmup_rounds,
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
    (out / json_name).write_text(json.dumps(result, indent=2) + "\n")
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
    return _pts_of(d, "dice-mean")


def _pts_of(d: dict[str, float] | None, key: str) -> float | None:
    if not d or key not in d:
        return None
    return 100.0 * float(d[key])


def goals(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each goal's figures (Dice points) and whether it is met (``None``: not measured)."""
    out: dict[str, dict[str, Any]] = {}
    new, loc = _pts(r.get("joiner")), _pts(r.get("local_only"))
    gain = None if new is None or loc is None else new - loc
    out["new_vs_local"] = {"gain": gain, "met": None if gain is None else gain >= GOAL_NEW_GAIN}
    after = r.get("after") or {}
    for key, reference in (("old_no_drop", r.get("before") or {}),
                           ("old_vs_control", (r.get("control_no_joiner") or {}).get("after") or {})):
        drops = _drops(reference, after)
        worst = max(drops.values()) if drops else None
        out[key] = {"drop": drops, "worst_drop": worst, "met": None if worst is None else worst <= GOAL_OLD_MAX_DROP}
    uni = r.get("universal")
    if uni:
        o = _pts(uni.get("oracle"))
        singles = [p for p in (_pts(d) for d in uni.get("single_site", {}).values()) if p is not None]
        best = max(singles) if singles else None
        out["universal"] = _universal_goal(_pts(uni.get("universal_abc")), best, o)
        for arm in ("uniform", "sharp", "confident"):
            if uni.get(f"universal_abc_{arm}") is not None:
                out[f"universal_{arm}"] = _universal_goal(_pts(uni[f"universal_abc_{arm}"]), best, o)
    else:
        out["universal"] = {"met": None}
    return out


def _drops(reference: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Per site scored in both: ``reference - after`` in Dice points (negative is a gain)."""
    out = {}
    for site, ref in reference.items():
        a, b = _pts(ref), _pts(after.get(site))
        if a is not None and b is not None:
            out[site] = a - b
    return out


def _universal_goal(u: float | None, best: float | None, oracle: float | None) -> dict[str, Any]:
    """Gap to the oracle, margin over the best single site, and whether both goals hold."""
    gap = None if u is None or oracle is None else oracle - u
    margin = None if u is None or best is None else u - best
    met = None if gap is None or margin is None else (gap <= GOAL_ORACLE_GAP and margin > 0)
    return {"gap_to_oracle": gap, "margin_over_best_single": margin, "met": met}


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
        for arm, label in (("uniform", "uniform mix"), ("sharp", "plain softmax gate, no fallback"),
                           ("confident", "most confident site per case (exploratory)")):
            if f"universal_{arm}" in g:
                ga = g[f"universal_{arm}"]
                lines.append(f"| (reference) universal(A,B,C), {label} | {_f(_pts(uni[f'universal_abc_{arm}']))} "
                             f"(gap to oracle {_f(ga['gap_to_oracle'])}, margin over best single "
                             f"{_f(ga['margin_over_best_single'])}) | same | {_met(ga['met'])} |")
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
            f"Gate weights over (A, B, C) per val case: {uni.get('gates_abc')} (plain softmax: "
            f"{uni.get('gates_abc_sharp')}); over (A, B, C, New): {uni.get('gates_abcn')}.",
            "",
        ]
        if uni.get("gate_check"):
            lines += [f"Gate of universal(A,B,C) per site's val cases (weight on the site itself; radii from "
                      f"the nearest site, > 1: treated as unseen): {_gate_check_text(uni['gate_check'])}.", ""]
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


def _gate_check_text(check: dict[str, dict[str, Any]]) -> str:
    return "; ".join(f"{s} " + (f"own weight {c['own_weight']}, " if c.get("own_weight") else "")
                     + f"radii {c['outside']}" for s, c in check.items())


# ----------------------------------------------------------------------------- several seeds

#: Rows of the multi-seed summary: name -> (label, figure of one run in Dice points or None).
SEED_ROWS: dict[str, tuple[str, Callable[[dict[str, Any]], float | None]]] = {
    "joiner_federated": ("hospitalNew federated", lambda r: _pts(r.get("joiner"))),
    "joiner_local_only": ("hospitalNew local-only", lambda r: _pts(r.get("local_only"))),
    "joiner_gain": ("hospitalNew gain (federated - local-only)", lambda r: r["goals"]["new_vs_local"]["gain"]),
    "joiner_rc_federated": ("hospitalNew RC (its own class), federated",
                            lambda r: _pts_of(r.get("joiner"), "dice-RC")),
    "joiner_rc_local_only": ("hospitalNew RC (its own class), local-only",
                             lambda r: _pts_of(r.get("local_only"), "dice-RC")),
    "old_worst_drop": ("old sites: worst drop before -> after", lambda r: r["goals"]["old_no_drop"]["worst_drop"]),
    "old_worst_drop_vs_control": ("old sites: worst drop vs control (no joiner)",
                                  lambda r: r["goals"]["old_vs_control"]["worst_drop"]),
    "old_mean_drop_vs_control": ("old sites: mean drop vs control (no joiner)",
                                 lambda r: _mean_or_none(r["goals"]["old_vs_control"]["drop"])),
    "universal_gate": ("universal(A,B,C) on hospitalNew, gate",
                       lambda r: _pts((r.get("universal") or {}).get("universal_abc"))),
    "universal_uniform": ("universal(A,B,C), uniform mix (reference)",
                          lambda r: _pts((r.get("universal") or {}).get("universal_abc_uniform"))),
    "universal_sharp": ("universal(A,B,C), plain softmax gate (previous)",
                        lambda r: _pts((r.get("universal") or {}).get("universal_abc_sharp"))),
    "universal_confident": ("universal(A,B,C), most confident site per case (exploratory)",
                            lambda r: _pts((r.get("universal") or {}).get("universal_abc_confident"))),
    "best_single_site": ("best single old site on hospitalNew", lambda r: _best_single(r)[1]),
    "oracle": ("oracle (hospitalNew's own model)", lambda r: _pts((r.get("universal") or {}).get("oracle"))),
    "gap_gate": ("gap to oracle, gate", lambda r: r["goals"]["universal"].get("gap_to_oracle")),
    "margin_gate": ("margin over best single, gate",
                    lambda r: r["goals"]["universal"].get("margin_over_best_single")),
    "gap_uniform": ("gap to oracle, uniform",
                    lambda r: r["goals"].get("universal_uniform", {}).get("gap_to_oracle")),
    "margin_uniform": ("margin over best single, uniform",
                       lambda r: r["goals"].get("universal_uniform", {}).get("margin_over_best_single")),
}


def _mean_or_none(values: dict[str, float]) -> float | None:
    return statistics.fmean(values.values()) if values else None


#: Goal -> (its key in :func:`goals`, the summary row it is judged on, the goal in words).
SEED_GOALS: dict[str, tuple[str, str, str]] = {
    "new_vs_local": ("new_vs_local", "joiner_gain", f"gain >= +{GOAL_NEW_GAIN:.0f}"),
    "old_no_drop": ("old_no_drop", "old_worst_drop", f"no drop > {GOAL_OLD_MAX_DROP:.0f}"),
    "old_vs_control": ("old_vs_control", "old_worst_drop_vs_control", f"no drop > {GOAL_OLD_MAX_DROP:.0f}"),
    "universal_gate": ("universal", "gap_gate",
                       f"within {GOAL_ORACLE_GAP:.0f} of oracle and above every single site"),
    "universal_uniform": ("universal_uniform", "gap_uniform", "same, uniform reference arm"),
}


def _best_single(r: dict[str, Any]) -> tuple[str | None, float | None]:
    singles = {s: _pts(d) for s, d in ((r.get("universal") or {}).get("single_site") or {}).items()}
    singles = {s: p for s, p in singles.items() if p is not None}
    if not singles:
        return None, None
    best = max(singles, key=singles.__getitem__)
    return best, singles[best]


def _spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Per-seed values with their mean, sample standard deviation, min and max (``None`` if any is missing)."""
    out: dict[str, Any] = {"per_seed": list(values)}
    if not values or any(v is None for v in values):
        return {**out, "mean": None, "sd": None, "min": None, "max": None}
    return {**out, "mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarize_seeds(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Each summary row over seeds (:data:`SEED_ROWS`) and, per goal, in how many seeds it is met."""
    rows = {k: {"label": label, **_spread([fn(r) for r in results])} for k, (label, fn) in SEED_ROWS.items()}
    met = {}
    for name, (key, _, _) in SEED_GOALS.items():
        per_seed = [r["goals"].get(key, {}).get("met") for r in results]
        met[name] = {"per_seed": per_seed, "met": sum(m is True for m in per_seed), "of": len(per_seed)}
    own = [w for r in results for c in ((r.get("universal") or {}).get("gate_check") or {}).values()
           for w in (c.get("own_weight") or [])]
    far = [k for r in results for k in ((r.get("universal") or {}).get("gate_check") or {})
           .get(JOINER, {}).get("outside", [])]
    return {"seeds": [r["seed"] for r in results], "rows": rows, "goals_met": met,
            "best_single_site": [_best_single(r)[0] for r in results],
            "old_val_own_weight": {"cases": len(own), "mean": statistics.fmean(own) if own else None,
                                   "min": min(own, default=None)},
            "joiner_outside": far}


def run_seeds(out: Path, seeds: Sequence[int], rounds_before: int = 4, rounds_after: int = 4,
              universal: bool = True, control_run: bool = True, log: Any = print,
              warmup: int | None = None) -> dict[str, Any]:
    """Run the join benchmark once per seed (``out/join_seed<N>.json``); write and return ``out/join_seeds.json``."""
    start = time.perf_counter()
    results = []
    for seed in seeds:
        log(f"-- seed {seed}")
        results.append(run_join_bench(out, rounds_before, rounds_after, seed, universal=universal,
                                      control_run=control_run, log=log, json_name=f"join_seed{seed}.json",
                                      warmup=warmup))
    first = results[0]
    combined = {
        "seeds": list(seeds), "rounds_before": rounds_before, "rounds_after": rounds_after,
        "local_steps": first["local_steps"], "cases_per_site": first["cases_per_site"], "policy": first["policy"],
        "sizes": first["sizes"], "val_cases": first["val_cases"],
        "files": [f"join_seed{s}.json" for s in seeds],
        "wall_s_per_seed": [r["wall_s"] for r in results], "wall_s": time.perf_counter() - start,
        "summary": summarize_seeds(results),
    }
    (Path(out) / "join_seeds.json").write_text(json.dumps(combined, indent=2) + "\n")
    return combined


def _cell(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def format_seeds_markdown(c: dict[str, Any], command: str) -> str:
    """The multi-seed report: per-seed figures, mean +- sd, and per goal in how many seeds it is met."""
    sm, seeds = c["summary"], c["seeds"]
    sz = c.get("sizes", {})
    head = "| Row | " + " | ".join(f"seed {s}" for s in seeds) + " | mean +- sd | Goal | Met in |"
    lines = [
        "# Join benchmark over several seeds",
        "",
        f"Seeds {seeds}; demo data, {c.get('cases_per_site')} cases per site (val cases: "
        + ", ".join(f"{s} {n}" for s, n in (c.get("val_cases") or {}).items()) + "); "
        f"features {sz.get('features')}, roi {sz.get('roi_size')}, {c.get('local_steps')} local steps per round, "
        f"{c.get('rounds_before')} rounds of hospitalA/B/C, then {c.get('rounds_after')} rounds of all four; "
        f"policy {c.get('policy')}, in-process. The seed sets initialization, split and sampling; the demo "
        "data are the same for every seed.",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {c.get('wall_s', 0.0):.0f} s on 2 CPU cores (per seed: "
        + ", ".join(f"{w:.0f} s" for w in c.get("wall_s_per_seed", [])) + ").",
        "",
        "Dice-mean in points; sd is the sample standard deviation over seeds.",
        "",
        head,
        "|---" * (len(seeds) + 4) + "|",
    ]
    judged = {row: name for name, (_, row, _) in SEED_GOALS.items()}
    for key, row in sm["rows"].items():
        goal, met = "-", "-"
        if key in judged:
            name = judged[key]
            goal = SEED_GOALS[name][2]
            gm = sm["goals_met"][name]
            met = f"{gm['met']}/{gm['of']}"
        mean = "n/a" if row["mean"] is None else f"{row['mean']:.1f} +- {row['sd']:.1f}"
        lines.append(f"| {row['label']} | " + " | ".join(_cell(v) for v in row["per_seed"])
                     + f" | {mean} | {goal} | {met} |")
    own = sm["old_val_own_weight"]
    lines += [
        "",
        "The universal goal counts a seed as met when the gap to the oracle is at most "
        f"{GOAL_ORACLE_GAP:.0f} points and the margin over the best single site is positive.",
        f"Best single old site per seed: {sm['best_single_site']}.",
        "",
        f"In-distribution check (universal(A,B,C) on hospitalA/B/C's own val cases, {own['cases']} cases over all "
        f"seeds): gate weight on the case's own site mean {_cell(None if own['mean'] is None else 100 * own['mean'])}%, "
        f"min {_cell(None if own['min'] is None else 100 * own['min'])}%. hospitalNew's val cases lie "
        f"{', '.join(f'{k:.0f}' for k in sm['joiner_outside'])} radii from the nearest old site.",
        "",
        "Per-seed results: " + ", ".join(f"[{f}]({f})" for f in c.get("files", [])) + ".",
        "",
    ]
    return "\n".join(lines)


def plot_seeds(c: dict[str, Any], path: Path) -> Path:
    """Per-seed bars on hospitalNew: best single site, the three universal arms, the oracle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("best_single_site", "universal_sharp", "universal_uniform", "universal_gate", "oracle")
    rows = c["summary"]["rows"]
    groups = [f"seed {s}" for s in c["seeds"]] + ["mean"]
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for i, k in enumerate(keys):
        vals = [v if v is not None else 0.0 for v in rows[k]["per_seed"]] + [rows[k]["mean"] or 0.0]
        xs = [g + (i - (len(keys) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, vals, width, label=rows[k]["label"])
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("Dice-mean on hospitalNew (points)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3)
    ax.set_title("Universal model on an unseen hospital")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m uharmony_fed.bench.join", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rounds-before", type=int, default=4)
    p.add_argument("--rounds-after", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", help="run each of these seeds and report the spread")
    p.add_argument("--no-universal", action="store_true")
    p.add_argument("--no-control", action="store_true", help="skip the old-sites-without-joiner control")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--join-warmup", type=int, default=None,
                   help="train.join_warmup_rounds for the joiner (default: the product's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.seeds:
        _main_seeds(a)
        return
    r = run_join_bench(a.out, a.rounds_before, a.rounds_after, a.seed, universal=not a.no_universal,
                       control_run=not a.no_control, warmup=a.join_warmup)
    cmd = f"python -m uharmony_fed.bench.join --out {a.out}"
    if (a.rounds_before, a.rounds_after, a.seed) != (4, 4, 0):
        cmd += f" --rounds-before {a.rounds_before} --rounds-after {a.rounds_after} --seed {a.seed}"
    md = format_markdown(r, cmd)
    (Path(a.out) / "join_bench.md").write_text(md)
    print(md)


def _main_seeds(a: argparse.Namespace) -> None:
    c = run_seeds(a.out, a.seeds, a.rounds_before, a.rounds_after, universal=not a.no_universal,
                  control_run=not a.no_control, warmup=a.join_warmup)
    cmd = f"python -m uharmony_fed.bench.join --out {a.out} --seeds {' '.join(map(str, a.seeds))}"
    if (a.rounds_before, a.rounds_after) != (4, 4):
        cmd += f" --rounds-before {a.rounds_before} --rounds-after {a.rounds_after}"
    if a.threads:
        cmd += f" --threads {a.threads}"
    if a.join_warmup is not None:
        cmd += f" --join-warmup {a.join_warmup}"
    md = format_seeds_markdown(c, cmd)
    if not a.no_universal:
        plot_seeds(c, Path(a.out) / "join_seeds.png")
        md += "\n![universal model on hospitalNew per seed](join_seeds.png)\n"
    (Path(a.out) / "join_seeds.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()


__all__ = ["format_markdown", "format_seeds_markdown", "goals", "main", "make_config", "plot_seeds",
           "run_join_bench", "run_seeds", "summarize_seeds"]
