"""Soak: 100 rounds in Flower's simulation engine without memory or file-handle growth."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from uharmony_fed.demo import make_demo
from uharmony_fed.fed.launch import simulate
from uharmony_fed.fedconfig import load_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ROUNDS = 100
#: Allowed growth between round 10 and round 100 (the first rounds load libraries and data).
RSS_BOUND_MB = 300.0
FILES_BOUND = 40


def _tree_usage(pid: int) -> tuple[float, int]:
    """Resident memory (MB) and open files of a process and all its descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0
    rss, files = 0, 0
    for p in procs:
        try:
            rss += p.memory_info().rss
            files += p.num_fds()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss / 2**20, files


def test_hundred_rounds_without_growth(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_demo(root, sites=3, cases=2, seed=1, spacing_mm=6.0, log=None)
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    cfg = replace(cfg, name="soak", data_root=root, demo=None,
                  train=replace(cfg.train, local_steps=1),
                  federation=replace(cfg.federation, rounds=ROUNDS, eval_every=25))
    run_dir = tmp_path / "run"
    samples: list[tuple[int, float, int]] = []
    stop = threading.Event()

    def sample(link) -> None:
        def loop() -> None:
            while not stop.is_set():
                metrics = run_dir / "metrics.jsonl"
                done = 0
                if metrics.is_file():
                    done = sum(1 for line in metrics.read_text().splitlines() if '"phase": "round"' in line)
                rss, files = _tree_usage(link.proc.pid)
                if rss:
                    samples.append((done, rss, files))
                time.sleep(1.0)

        threading.Thread(target=loop, daemon=True).start()

    try:
        result = simulate(cfg, run_dir, echo=False, timeout=900, on_started=sample)
    finally:
        stop.set()
    assert result.returncode == 0
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"phase": "round"' in x]
    assert len(rounds) == ROUNDS

    def at(r: int) -> tuple[float, int]:
        near = [s for s in samples if s[0] >= r] or samples[-1:]
        return near[0][1], near[0][2]

    (rss10, f10), (rss50, f50), (rss100, f100) = at(10), at(50), at(ROUNDS - 1)
    rss1, f1 = at(1)
    print(f"\nsoak: RSS of the SuperLink process tree {rss1:.0f} MB at round 1, {rss50:.0f} MB at 50, "
          f"{rss100:.0f} MB at {ROUNDS}; open files {f1}, {f50}, {f100}; "
          f"{result.seconds:.0f} s for {ROUNDS} rounds")
    (tmp_path.parent / "soak.txt").write_text(json.dumps(
        {"rss_mb": [rss1, rss50, rss100], "files": [f1, f50, f100], "seconds": result.seconds}))
    assert rss100 - rss10 < RSS_BOUND_MB
    assert f100 - f10 < FILES_BOUND
