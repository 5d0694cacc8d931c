"""Run config parsing, the round spec that crosses the wire, and atomic checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from uharmony_fed.checkpoint import (
    CorruptFileError,
    checkpoint_path,
    load_latest_checkpoint,
    load_payload,
    save_checkpoint,
    save_payload,
)
from uharmony_fed.config import ConfigError
from uharmony_fed.fed.strategies import STRATEGIES, build_strategy
from uharmony_fed.fed.wire import RoundSpec
from uharmony_fed.fedconfig import load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fed.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "where", "hint"),
    [
        ("federation: {polcy: fedavg}\n", "federation.polcy", "did you mean 'policy'"),
        ("federation: {rounds: three}\n", "federation.rounds", "expected an integer"),
        ("federation: {policy: fedsgd}\n", "federation", "expected one of"),
        ("federation: {strategy: fedavgg}\n", "federation.strategy", "did you mean 'fedavg'"),
        ("trian: {lr: 0.1}\n", "trian", "did you mean 'train'"),
        ("train: {lr: -1}\n", "train", "train.lr must be > 0"),
        ("model: {norm: batch}\n", "model.norm", "'uharmony'"),
        ("data: {spacing: [1, 1]}\n", "data.spacing", "expected 3 items"),
        ("sites: [a, a]\n", "", "unique"),
        ("federation: {min_sites: 5}\n", "", "larger than the number of sites"),
        ("- just\n- a list\n", "", "expected a mapping"),
        ("federation: {rounds: [\n", "", "not valid YAML"),
    ],
)
def test_bad_config_names_key_and_fix(tmp_path: Path, text: str, where: str, hint: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    message = str(err.value)
    assert str(tmp_path / "fed.yaml") in message
    assert where in message and hint in message
    assert "\n" not in message


def test_hyphenated_keys_and_overrides(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "federation: {min-sites: 3, rounds: 2}\n"),
                      overrides={"train": {"local_steps": 3}})
    assert cfg.federation.min_sites == 3 and cfg.federation.rounds == 2
    assert cfg.train.local_steps == 3
    assert cfg.data_root.is_absolute()


def test_round_spec_round_trips_as_flat_scalars() -> None:
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    spec = RoundSpec.from_fed(cfg, 2)
    record = spec.to_record()
    assert all(isinstance(v, (str, int, float)) for v in record.values())
    assert RoundSpec.from_record(record) == spec
    assert spec.prox_mu == 0.0  # only fedprox sends a proximal term


def test_every_strategy_builds_from_config() -> None:
    from dataclasses import replace

    cfg = load_config()
    for name in STRATEGIES:
        strategy = build_strategy(replace(cfg, federation=replace(cfg.federation, strategy=name)))
        assert strategy.min_available_nodes == cfg.federation.min_sites
    bad = replace(cfg, federation=replace(cfg.federation, strategy_args={"nonsense": 1.0}))
    with pytest.raises(ValueError, match="strategy_args"):
        build_strategy(bad)


def test_checkpoints_are_atomic_checksummed_and_pruned(tmp_path: Path) -> None:
    for rnd in range(1, 5):
        save_checkpoint(tmp_path, rnd, {"arrays": {"w": torch.full((3,), float(rnd))}}, keep=2)
    assert not checkpoint_path(tmp_path, 2).exists() and checkpoint_path(tmp_path, 3).exists()
    assert load_latest_checkpoint(tmp_path)["round"] == 4
    # A damaged newest checkpoint is skipped, never trained on.
    newest = checkpoint_path(tmp_path, 4)
    newest.write_bytes(newest.read_bytes()[:-7])
    latest = load_latest_checkpoint(tmp_path)
    assert latest["round"] == 3 and torch.equal(latest["arrays"]["w"], torch.full((3,), 3.0))
    with pytest.raises(CorruptFileError, match="checksum"):
        load_payload(newest)
    assert not [p for p in os.listdir(tmp_path / "checkpoints") if ".tmp" in p]


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.ckpt"
    save_payload(path, {"v": 1})

    def full_disk(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_payload(path, {"v": 2})
    monkeypatch.undo()
    assert load_payload(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.ckpt"]
