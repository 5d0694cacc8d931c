"""The benchmark's pure pieces: AUC, summaries, goals, report writing, layer timing (no simulation)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from uharmony_fed.bench import add_parser, summary
from uharmony_fed.bench.arms import fedavg, mean_local
from uharmony_fed.bench.cost import array_record_bytes, bytes_per_policy, count_windows, layer_cost
from uharmony_fed.bench.report import plot_curves, plot_overlay, plot_site_bars, write_markdown
from uharmony_fed.bench.settings import load_bench_config
from uharmony_fed.model import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def test_best_so_far_and_auc_rounds():
    assert summary.best_so_far([0.1, 0.3, 0.2, float("nan")]) == [0.1, 0.3, 0.3, 0.3]
    assert summary.auc_rounds([0.1, 0.3, 0.2]) == pytest.approx((0.1 + 0.3 + 0.3) / 3)
    assert summary.auc_rounds([0.5]) == 0.5
    assert math.isnan(summary.auc_rounds([]))


def test_auc_time_counts_time_before_a_result():
    # rounds end at 1, 2, 4 s: 0 until 1 s, 0.1 until 2 s, 0.3 until 4 s
    assert summary.auc_time([0.1, 0.3, 0.2], [1, 1, 2]) == pytest.approx((0.1 * 1 + 0.3 * 2) / 4)
    # on a longer common axis the last best holds to the end
    assert summary.auc_time_budget([0.5], [1.0], 2.0) == pytest.approx(0.25)
    # a run twice as slow with the same curve scores less on a common axis
    fast = summary.auc_time_budget([0.2, 0.6], [1, 1], 4)
    slow = summary.auc_time_budget([0.2, 0.6], [2, 2], 4)
    assert fast > slow


def _rows(dice_by_round: dict[int, dict[str, float]], seconds: float = 2.0) -> list[dict]:
    rows = []
    for rnd, sites in dice_by_round.items():
        for site, d in sites.items():
            rows.append({"round": rnd, "phase": "train", "site": site, "train-loss": 1.0})
            rows.append({"round": rnd, "phase": "eval", "site": site, "dice-WT": d, "dice-mean": d})
        rows.append({"round": rnd, "phase": "round", "seconds": seconds, "sites": len(sites)})
    return rows


def test_curve_and_final_from_metrics_rows():
    rows = _rows({1: {"a": 0.2, "b": 0.4}, 2: {"a": 0.6, "b": 0.8}})
    rounds, values, secs = summary.curve(rows)
    assert rounds == [1, 2] and values == pytest.approx([0.3, 0.7]) and secs == [2.0, 2.0]
    assert summary.final_per_site(rows) == {"a": {"dice-WT": 0.6, "dice-mean": 0.6},
                                            "b": {"dice-WT": 0.8, "dice-mean": 0.8}}


def _run(arm: str, seed: int, d: float) -> dict:
    return {"arm": arm, "seed": seed, "runtime": "in-process", "wall_s": 1.0,
            "final": {"a": {"dice-WT": d, "dice-mean": d}, "b": {"dice-WT": d + 0.1, "dice-mean": d + 0.1}},
            "curve": [{"round": 1, "dice": d / 2, "seconds": 1.0, "sites": {}},
                      {"round": 2, "dice": d, "seconds": 1.0, "sites": {}}]}


def _result() -> dict:
    runs = [_run(a, s, d + 0.01 * s) for a, d in (("fedavg", 0.5), ("fedbn", 0.55), ("fedper", 0.52),
                                                 ("uharmony", 0.6), ("centralized", 0.58), ("oracle", 0.62))
            for s in (0, 1)]
    acc = summary.accuracy_table(runs)
    return {"runs": runs, "accuracy": acc, "convergence": summary.convergence_table(runs),
            "goals": summary.accuracy_goals(acc), "loso": [], "errors": [],
            "cost": {"layer": [{"shape": [2, 8, 8, 8, 8], "instancenorm_ms": 1.0, "uharmony_ms": 1.1, "ratio": 1.1}]},
            "meta": {"command": "uharmony-fed bench --quick", "quick": True, "wall_s": 60.0, "machine": "test",
                     "started": "now", "config_yaml": "seeds: [0, 1]\n", "notes": ["synthetic"]}}


def test_accuracy_table_spread_and_goals():
    acc = _result()["accuracy"]
    assert acc["uharmony"]["mean"]["n"] == 2
    assert acc["uharmony"]["mean"]["mean"] == pytest.approx(0.655)
    assert acc["uharmony"]["sites"]["a"]["dice-mean"]["std"] == pytest.approx(0.01 / math.sqrt(2))
    goals = {g["goal"]: g for g in summary.accuracy_goals(acc)}
    assert goals["uharmony - fedavg (Dice points)"]["value"] == pytest.approx(10.0)
    assert goals["uharmony - fedavg (Dice points)"]["met"] is True
    assert goals["uharmony - centralized oracle (Dice points)"]["met"] is False  # -2 points < -1.5


def test_report_writes_markdown_and_pictures(tmp_path):
    result = _result()
    pics = {"curves": plot_curves(result["runs"], tmp_path / "c.png").name,
            "site_bars": plot_site_bars(result["accuracy"], tmp_path / "s.png").name}
    mask = torch.zeros(3, 8, 8)
    mask[:, 2:5, 2:5] = 1
    pics["overlay_best"] = plot_overlay([{"site": "a", "image": torch.rand(8, 8), "label": mask, "pred": mask,
                                          "dice": 1.0}], "t", tmp_path / "o.png").name
    md = write_markdown(result, tmp_path / "bench.md", pics).read_text()
    for p in ("c.png", "s.png", "o.png"):
        assert (tmp_path / p).stat().st_size > 0 and f"({p})" in md
    assert "| uharmony | 2 | **65.5 ± 0.7** |" in md
    assert "uharmony - fedavg (Dice points) | 10 | >= 3.0 | met" in md
    assert "uharmony-fed bench --quick" in md


def test_layer_cost_on_tiny_sizes():
    rows = layer_cost([(1, 4, 6, 6, 6)], ModelConfig(), min_run_s=0.01)
    assert rows[0]["shape"] == [1, 4, 6, 6, 6]
    assert rows[0]["uharmony_ms"] > 0 and rows[0]["instancenorm_ms"] > 0
    assert rows[0]["ratio"] == pytest.approx(rows[0]["uharmony_ms"] / rows[0]["instancenorm_ms"])


def test_bytes_per_policy_plan_and_record_agree():
    table = bytes_per_policy(ModelConfig(features=(4, 8, 16), head_channels=4))
    assert set(table) == {"local-only", "fedavg", "fedbn", "fedper", "uharmony"}
    assert table["local-only"]["plan_bytes"] == 0
    assert table["uharmony"]["plan_bytes"] < table["fedavg"]["plan_bytes"]
    # the ArrayRecord adds a small header per tensor on top of the float32 payload
    for row in table.values():
        assert row["record_bytes"] >= row["plan_bytes"]
    assert array_record_bytes({"w": torch.zeros(10, 10)}) >= 400


def test_count_windows_matches_monai():
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    for volume, roi in (((240, 240, 155), (128, 128, 128)), ((40, 50, 44), (32, 32, 32)), ((20, 20, 20), (32, 32, 32))):
        roi_eff = tuple(min(r, v) for r, v in zip(roi, volume))
        interval = _get_scan_interval(volume, roi_eff, 3, (0.25,) * 3)
        assert count_windows(volume, roi, 0.25) == len(dense_patch_slices(volume, roi_eff, interval))


def test_fedavg_and_mean_local():
    a = {"w": torch.ones(2)}
    b = {"w": torch.full((2,), 4.0)}
    assert torch.allclose(fedavg([(a, 1.0), (b, 2.0)])["w"], torch.full((2,), 3.0))
    m = mean_local([{"x": torch.tensor([1.0]), "n": torch.tensor(3)}, {"x": torch.tensor([3.0]), "n": torch.tensor(5)}])
    assert m["x"].item() == 2.0 and m["n"].item() == 3


def test_bench_config_quick_merges_and_parser_defaults():
    cfg, raw = load_bench_config(ROOT / "configs" / "bench.yaml", quick=True)
    assert cfg.seeds == (0, 1) and cfg.simulate_seeds == 1
    assert cfg.fed_config().federation.rounds == 6
    assert "default" in cfg.ablations.run and "order-1" in cfg.ablations.variants
    full, _ = load_bench_config(ROOT / "configs" / "bench.yaml")
    assert len(full.seeds) >= 2 and full.fed_config().federation.rounds > 6
    embedded, _ = load_bench_config(None)
    assert embedded.fed_config().name == "bench"
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["bench", "--quick"])
    assert args.quick and args.out == "bench_out"
    json.dumps(raw)
