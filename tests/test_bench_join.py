"""The join benchmark's goal checks and report table, from a synthetic result (no training)."""

from __future__ import annotations

from uharmony_fed.bench.join import format_markdown, format_seeds_markdown, goals, plot_seeds, summarize_seeds


def _d(x: float) -> dict[str, float]:
    return {"dice-mean": x}


def _result(universal: bool = True) -> dict:
    return {
        "seed": 0, "rounds_before": 4, "rounds_after": 4, "local_steps": 10, "cases_per_site": 6,
        "policy": "uharmony", "sizes": {"features": [8, 16, 32], "roi_size": [24, 24, 24]},
        "val_cases": {"hospitalA": 2, "hospitalNew": 2},
        "before": {"hospitalA": _d(0.60), "hospitalB": _d(0.50)},
        "after": {"hospitalA": _d(0.605), "hospitalB": _d(0.48), "hospitalNew": _d(0.40)},
        "joiner": _d(0.40), "local_only": _d(0.30),
        "control_no_joiner": {"after": {"hospitalA": _d(0.61), "hospitalB": _d(0.485)}},
        "universal": {"single_site": {"hospitalA": _d(0.30), "hospitalB": _d(0.36)}, "oracle": _d(0.40),
                      "universal_abc": _d(0.385), "gates_abc": [[1.0, 0.0]]} if universal else None,
        "timings": {"phase1_s": 10.0}, "wall_s": 42.0,
    }


def test_goals_and_table() -> None:
    r = _result()
    g = goals(r)
    assert abs(g["new_vs_local"]["gain"] - 10.0) < 1e-9 and g["new_vs_local"]["met"] is True
    assert abs(g["old_no_drop"]["worst_drop"] - 2.0) < 1e-9 and g["old_no_drop"]["met"] is False
    assert abs(g["old_vs_control"]["worst_drop"] - 0.5) < 1e-9 and g["old_vs_control"]["met"] is True
    assert abs(g["universal"]["gap_to_oracle"] - 1.5) < 1e-9 and g["universal"]["met"] is True
    md = format_markdown(r, "python -m uharmony_fed.bench.join --out X")
    assert "One seed" in md and "`python -m uharmony_fed.bench.join --out X`" in md
    assert "| hospitalNew: federated vs local-only | 40.0 vs 30.0 (gain 10.0) | gain >= +5 | **met** |" in md
    assert "hospitalB 50.0 -> 48.0" in md and "hospitalB 48.0 vs 48.5" in md and "**not met**" in md

    r2 = _result(universal=False)
    assert goals(r2)["universal"]["met"] is None
    assert "| universal vs single site vs oracle | skipped |" in format_markdown(r2)


def test_seed_summary_and_table(tmp_path) -> None:
    runs = []
    for seed, (uni, uniform) in enumerate(((0.385, 0.33), (0.30, 0.39))):
        r = _result()
        r["seed"] = seed
        r["universal"]["universal_abc"] = _d(uni)
        r["universal"]["universal_abc_uniform"] = _d(uniform)
        r["universal"]["universal_abc_sharp"] = _d(0.30)
        r["universal"]["gate_check"] = {"hospitalA": {"own_weight": [0.9, 1.0], "outside": [0.4, 0.5]},
                                        "hospitalNew": {"own_weight": None, "outside": [30.0, 40.0]}}
        r["goals"] = goals(r)
        runs.append(r)
    sm = summarize_seeds(runs)
    gate, uniform = sm["rows"]["universal_gate"], sm["rows"]["universal_uniform"]
    assert [round(v, 6) for v in gate["per_seed"]] == [38.5, 30.0]
    assert abs(gate["mean"] - 34.25) < 1e-9 and abs(gate["sd"] - 6.0104076) < 1e-6
    assert abs(uniform["mean"] - 36.0) < 1e-9
    assert sm["goals_met"]["universal_gate"] == {"per_seed": [True, False], "met": 1, "of": 2}
    assert sm["goals_met"]["universal_uniform"]["met"] == 1  # 33.0 is below hospitalB's 36.0
    assert sm["best_single_site"] == ["hospitalB", "hospitalB"]
    assert sm["old_val_own_weight"] == {"cases": 4, "mean": 0.95, "min": 0.9}
    assert sm["joiner_outside"] == [30.0, 40.0, 30.0, 40.0]
    c = {"seeds": [0, 1], "summary": sm, "wall_s_per_seed": [40.0, 41.0], "wall_s": 81.0,
         "files": ["join_seed0.json", "join_seed1.json"]}
    md = format_seeds_markdown(c, "python -m uharmony_fed.bench.join --out X --seeds 0 1")
    assert "| universal(A,B,C) on hospitalNew, gate | 38.5 | 30.0 | 34.2 +- 6.0 | - | - |" in md
    assert "| gap to oracle, gate | 1.5 | 10.0 | 5.8 +- 6.0 | within 2 of oracle and above every single site | 1/2 |" in md
    assert "`python -m uharmony_fed.bench.join --out X --seeds 0 1`" in md
    assert plot_seeds(c, tmp_path / "s.png").stat().st_size > 0
