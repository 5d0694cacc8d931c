"""Input benchmark: how sites with different sequence sets should feed one shared backbone.

Two designs, measured side by side on the same federation, seeds and budget:

- ``union``: every site feeds the union of sequences (t1n, t1c, t2w, t2f); the ones it
  lacks are declared missing and arrive as zero channels;
- ``union+dropout``: the same, and in training one present sequence of a patch is
  blanked with probability ``DROPOUT`` (``data.modality_dropout``), so the shared
  backbone learns not to rely on any single sequence;
- ``adapter``: the union input goes through a small site-local input adapter
  (``model.input_adapter: linear``, a 1x1x1 convolution that starts as the identity and
  never leaves the site) in front of the shared backbone.

The federation is the demo with the joining hospital from round 1: hospitalA (all four
sequences), hospitalB (no T1n), hospitalC (all four, whole-tumour labels only) and
hospitalNew (T1c and FLAIR only). In-process rounds (``run_inprocess``: the same
``SiteRuntime`` and example-weighted FedAvg as the Flower run), policy ``uharmony``.

``python -m uharmony_fed.bench.inputs --out DIR [--seeds 0 1 2]`` writes
``DIR/inputs.json``, ``DIR/inputs_bench.md`` and ``DIR/inputs_dice.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from uharmony_fed.bench.arms import reset_state, run_inprocess
from uharmony_fed.bench.join import FED_OVERRIDES
from uharmony_fed.bench.summary import spread
from uharmony_fed.fedconfig import FedConfig, load_config

SITES = ("hospitalA", "hospitalB", "hospitalC", "hospitalNew")
CASES = 8
ROUNDS = 8
DROPOUT = 0.25

#: arm -> config overrides on top of :data:`uharmony_fed.bench.join.FED_OVERRIDES`.
ARMS: dict[str, dict[str, dict[str, Any]]] = {
    "union": {"model": {"input_adapter": "none"}, "data": {"modality_dropout": 0.0}},
    "union+dropout": {"model": {"input_adapter": "none"}, "data": {"modality_dropout": DROPOUT}},
    "adapter": {"model": {"input_adapter": "linear"}, "data": {"modality_dropout": 0.0}},
}


def make_config(out: Path, arm: str, seed: int, rounds: int = ROUNDS) -> FedConfig:
    """The bench-size federation of ``arm`` over :data:`SITES` of the demo under ``out/data``."""
    over = json.loads(json.dumps(FED_OVERRIDES))
    for section, values in ARMS[arm].items():
        over[section].update(values)
    over.update({"name": f"inputs-{arm}", "data_root": str(out / "data"), "sites": list(SITES), "seed": seed})
    over["federation"].update({"rounds": rounds, "min_sites": 2, "eval_every": rounds})
    return load_config(None, over)


def _site_dice(final: dict[str, dict[str, float]]) -> dict[str, float]:
    """Dice-mean in points per site."""
    return {s: 100.0 * m["dice-mean"] for s, m in final.items() if "dice-mean" in m}


def run_inputs_bench(out: Path, seeds: tuple[int, ...] = (0,), rounds: int = ROUNDS,
                     log: Any = print) -> dict[str, Any]:
    """Every arm of :data:`ARMS` for every seed; returns (and writes) ``out/inputs.json``."""
    from uharmony_fed.demo import make_demo

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "data" / SITES[-1] / "site.yaml").is_file():
        make_demo(out / "data", sites=3, cases=CASES, seed=0, joiner=True, log=None)
    runs = []
    for seed in seeds:
        for arm in ARMS:
            cfg = make_config(out, arm, seed, rounds)
            reset_state(cfg)
            t0 = time.perf_counter()
            rec, _, _ = run_inprocess(arm, cfg, out / "runs" / f"{arm}-seed{seed}", log=lambda _m: None)
            dice = _site_dice(rec["final"])
            runs.append({"arm": arm, "seed": seed, "wall_s": time.perf_counter() - t0, "dice": dice,
                         "final": rec["final"]})
            log(f"seed {seed} {arm:14s} " + "  ".join(f"{s} {d:5.1f}" for s, d in dice.items())
                + f"  ({runs[-1]['wall_s']:.0f} s)")
    result = {"sites": list(SITES), "seeds": list(seeds), "rounds": rounds, "cases_per_site": CASES,
              "dropout": DROPOUT, "overrides": FED_OVERRIDES, "runs": runs, "table": table(runs)}
    (out / "inputs.json").write_text(json.dumps(result, indent=1))
    return result


def table(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm: seed spread of each site's Dice, of the mean over sites, and of the sites with missing sequences."""
    missing = ("hospitalB", "hospitalNew")
    res: dict[str, dict[str, Any]] = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == arm]
        row = {s: spread([r["dice"].get(s) for r in mine]) for s in SITES}
        row["all sites"] = spread([_mean(r) for r in mine])
        row["missing-sequence sites"] = spread([sum(r["dice"][s] for s in missing) / len(missing) for r in mine])
        row["wall_s"] = spread([r["wall_s"] for r in mine])
        res[arm] = row
    # Paired by seed (same splits and initial weights): the fairer view of a small gap.
    base = {r["seed"]: _mean(r) for r in runs if r["arm"] == "union"}
    for arm, row in res.items():
        row["vs union (paired)"] = spread([_mean(r) - base[r["seed"]] for r in runs
                                           if r["arm"] == arm and r["seed"] in base])
    return res


def _mean(run: dict[str, Any]) -> float:
    return sum(run["dice"].values()) / len(run["dice"])


def _cell(s: dict[str, float]) -> str:
    return f"{s['mean']:.1f} ± {s['std']:.1f}" if s["n"] > 1 else f"{s['mean']:.1f}"


def choice(result: dict[str, Any]) -> str:
    """The arm to ship: ``union`` unless another arm's paired gain over it is clear.

    Clear means a mean gain of more than two standard errors of the per-seed differences;
    anything less is within the seed-to-seed noise of this size, and the simpler design
    (no extra site-local parameters, nothing to tune) wins the tie.
    """
    t = result["table"]
    best, gain = "union", 0.0
    for arm, row in t.items():
        d = row["vs union (paired)"]
        clear = d["n"] > 1 and d["mean"] > 2.0 * d["std"] / d["n"] ** 0.5
        if arm != "union" and clear and d["mean"] > gain:
            best, gain = arm, d["mean"]
    return best


def format_markdown(result: dict[str, Any], command: str) -> str:
    """The results table (mean ± sd over seeds, Dice points) and the choice it supports."""
    t = result["table"]
    cols = [*result["sites"], "all sites", "missing-sequence sites"]
    lines = [
        "| arm | " + " | ".join(cols) + " | wall s |",
        "|---|" + "---|" * (len(cols) + 1),
    ]
    for arm, row in t.items():
        lines.append(f"| {arm} | " + " | ".join(_cell(row[c]) for c in cols) + f" | {row['wall_s']['mean']:.0f} |")
    best = choice(result)
    ratios = ", ".join(f"{arm} {row['vs union (paired)']['mean']:+.1f} ± {row['vs union (paired)']['std']:.1f}"
                       for arm, row in t.items() if arm != "union")
    return "\n".join([
        "# Input benchmark: union of sequences vs a site-local input adapter",
        "",
        "Sites with different sequence sets train one shared backbone (policy uharmony). "
        "hospitalA has all four sequences, hospitalB lacks T1n, hospitalC has all four but labels "
        "only the whole tumour, hospitalNew has only T1c and FLAIR. Arms: `union` (declared-missing "
        "sequences are zero channels), `union+dropout` (the same, and one present sequence of a "
        f"training patch blanked with probability {result['dropout']}), `adapter` (a site-local "
        "1x1x1 convolution, identity at start, in front of the shared backbone; 20 parameters per "
        "site that never leave it). Same federation, splits, seeds, initial weights and step budget; "
        "in-process rounds (the SiteRuntime code of the Flower client, example-weighted FedAvg).",
        "",
        f"Command: `{command}`",
        "",
        f"Seeds {result['seeds']}, {result['rounds']} rounds, {result['cases_per_site']} cases per site; "
        "Dice-mean over each site's annotated regions on its val split, in points, at the last round "
        "(mean ± sample sd over seeds).",
        "",
        *lines,
        "",
        f"Against `union`, all-site mean, paired by seed (mean ± sd of the per-seed difference): {ratios}. "
        f"Rule: another arm replaces `union` only if its paired gain exceeds two standard errors "
        f"(sd / sqrt(seeds)). Choice: **{best}**.",
        "",
    ])


def plot(result: dict[str, Any], path: Path) -> None:
    """Grouped bars: per-site Dice of every arm (seed mean, sd as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    t = result["table"]
    cols = [*result["sites"], "all sites"]
    x = np.arange(len(cols))
    width = 0.8 / len(t)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for i, (arm, row) in enumerate(t.items()):
        ax.bar(x + i * width, [row[c]["mean"] for c in cols], width, yerr=[row[c]["std"] for c in cols],
               label=arm, capsize=2)
    ax.set_xticks(x + width * (len(t) - 1) / 2, cols)
    ax.set_ylabel("Dice (points)")
    ax.set_title(f"Heterogeneous inputs: seeds {result['seeds']}, {result['rounds']} rounds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m uharmony_fed.bench.inputs", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--rounds", type=int, default=ROUNDS)
    a = p.parse_args(argv)
    start = time.perf_counter()
    result = run_inputs_bench(a.out, tuple(a.seeds), a.rounds)
    cmd = f"python -m uharmony_fed.bench.inputs --out {a.out} --seeds {' '.join(map(str, a.seeds))}"
    if a.rounds != ROUNDS:
        cmd += f" --rounds {a.rounds}"
    md = format_markdown(result, cmd) + f"\nWall time: {time.perf_counter() - start:.0f} s.\n"
    (a.out / "inputs_bench.md").write_text(md)
    plot(result, a.out / "inputs_dice.png")
    print(md)


if __name__ == "__main__":
    main()


__all__ = ["ARMS", "choice", "format_markdown", "main", "make_config", "run_inputs_bench"]
