"""The input benchmark's table and ship rule (its figures come only from a run: docs/inputs_bench.md)."""

from __future__ import annotations

from uharmony_fed.bench.inputs import SITES, choice, format_markdown, table


def _runs(gains: dict[str, list[float]]) -> list[dict]:
    """Runs whose every site scores ``50 + gain`` for each seed."""
    return [{"arm": arm, "seed": seed, "wall_s": 1.0, "dice": {s: 50.0 + g for s in SITES}}
            for arm, per_seed in gains.items() for seed, g in enumerate(per_seed)]


def test_an_arm_replaces_union_only_when_its_paired_gain_is_clear() -> None:
    noisy = {"union": [0, 0, 0, 0], "union+dropout": [0, 0, 0, 0], "adapter": [9, -6, 8, -5]}
    result = {"sites": list(SITES), "seeds": [0, 1, 2, 3], "rounds": 1, "cases_per_site": 1, "dropout": 0.25,
              "table": table(_runs(noisy))}
    assert result["table"]["adapter"]["vs union (paired)"]["mean"] == 1.5
    assert choice(result) == "union"
    clear = {"union": [0, 0, 0, 0], "union+dropout": [0, 0, 0, 0], "adapter": [3, 2, 4, 3]}
    result["table"] = table(_runs(clear))
    assert choice(result) == "adapter"
    md = format_markdown(result, "cmd")
    assert "| adapter | 53.0 ± 0.8 |" in md and "Choice: **adapter**" in md
