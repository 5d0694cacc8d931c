"""The server's round loop: k-of-n sampling, reply checks, aggregation, checkpoints.

Flower's ``Strategy.start`` has no checkpoint, resume or deadline for late sites, so the
loop is ours while the sampling, messages and aggregation are the strategy's own.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from uharmony_fed import REGIONS
from uharmony_fed.checkpoint import atomic_write_bytes, load_latest_checkpoint, save_checkpoint, save_payload
from uharmony_fed.fed.strategies import build_strategy, load_strategy_state, privacy_spent, strategy_state
from uharmony_fed.fed.site_runtime import TRAIN_METRICS
from uharmony_fed.fed.wire import ARRAYS, METRICS, SITE, RoundSpec
from uharmony_fed.fedconfig import FedConfig, config_to_dict
from uharmony_fed.model import build_model
from uharmony_fed.policy import canonical_state, get_policy, split_keys

log = logging.getLogger("uharmony_fed.server")


def say(text: str) -> None:
    """Progress for the operator: printed (streamed by ``flwr run``) and logged."""
    print(text, flush=True)


def initial_shared_arrays(cfg: FedConfig) -> dict[str, torch.Tensor]:
    """The shared part of a freshly initialized model: the exchange contract's keys."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    shared, _ = split_keys(model, get_policy(cfg.federation.policy))
    canon = canonical_state(model)
    return {k: canon[k].detach().clone().float() for k in shared}


def check_reply(msg: Message, expected: dict[str, torch.Tensor], max_update_norm: float) -> str | None:
    """Why a train reply must not be aggregated, or None when it is sound.

    Checks: one ArrayRecord and one MetricRecord under the contract's names (Flower's
    strategies skip the whole round's aggregation when one reply has more), exactly the
    shared keys and shapes, finite values, the train metric names with a finite positive
    ``num-examples`` (a NaN or infinite weight poisons a weighted average just like a NaN
    array), and (when configured) an update norm ||w_site - w_global|| within the bound.
    """
    if msg.has_error():
        return f"error reply: {msg.error.reason}"
    content = msg.content
    if ARRAYS not in content.array_records or METRICS not in content.metric_records:
        return "reply lacks its arrays or metrics"
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return (f"extra records (arrays {sorted(content.array_records)}, "
                f"metrics {sorted(content.metric_records)})")
    metric_keys = set(content[METRICS].keys())
    if metric_keys != set(TRAIN_METRICS):
        # Flower also skips aggregation when metric names differ between replies.
        return (f"metric names {sorted(metric_keys - set(TRAIN_METRICS))[:3]} unexpected, "
                f"{sorted(set(TRAIN_METRICS) - metric_keys)[:3]} missing")
    if any(not isinstance(v, (int, float)) for v in content[METRICS].values()):
        return "a metric is not a scalar number"
    num = content[METRICS]["num-examples"]
    if not isinstance(num, (int, float)) or not math.isfinite(num) or num <= 0:
        return f"num-examples {num!r} is not a finite positive number"
    try:
        arrays = content[ARRAYS].to_torch_state_dict()
    except Exception as exc:  # noqa: BLE001 - undecodable bytes are the sender's fault
        return f"arrays cannot be decoded ({type(exc).__name__})"
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        return f"wrong key set (missing {missing[:3]}, unexpected {extra[:3]})"
    sq = 0.0
    for key, ref in expected.items():
        got = arrays[key]
        if tuple(got.shape) != tuple(ref.shape):
            return f"{key}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
        if not torch.isfinite(got).all():
            return f"{key}: non-finite values"
        sq += float(((got.float() - ref.float()) ** 2).sum())
    if max_update_norm > 0 and not math.sqrt(sq) <= max_update_norm:
        return f"update norm {math.sqrt(sq):.3g} exceeds federation.max_update_norm {max_update_norm}"
    return None


def reply_node(msg: Message, sent: dict[str, int]) -> int:
    """The node a reply answers for.

    SuperLink answers for a node that stopped sending heartbeats with an error reply of its
    own (its own node id as the source); the id of the message it replies to still names
    the node. ``sent`` maps the ids of the messages sent this round to their nodes.
    """
    return sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)


def site_name(msg: Message, known: dict[int, str], node: int | None = None) -> str:
    """The site a reply came from (or its node id while it never said)."""
    node = msg.metadata.src_node_id if node is None else node
    if not msg.has_error() and SITE in msg.content.config_records:
        known[node] = str(msg.content[SITE].get("name", f"node-{node}"))[:64]
    return known.get(node, f"node-{node}")


def wait_for_sites(grid: Grid, min_sites: int, expected: int, deadline_s: float) -> list[int]:
    """Wait until every expected site is connected, or ``min_sites`` are and the deadline passed.

    Flower's own sampling waits without a deadline for its minimum; this bounded wait is
    what lets a round go on with k of n sites.
    """
    start = time.monotonic()
    shown = -1
    while True:
        nodes = list(grid.get_node_ids())
        waited = time.monotonic() - start
        if len(nodes) >= expected or (len(nodes) >= min_sites and waited >= deadline_s):
            return nodes
        if len(nodes) != shown:
            say(f"waiting for sites: {len(nodes)} of {expected} connected "
                f"(minimum {min_sites}, deadline {deadline_s:.0f} s)")
            shown = len(nodes)
        time.sleep(1.0)


@dataclass
class RunLog:
    """The run directory: config, metrics (JSON lines), checkpoints, final model."""

    run_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)

    def write_config(self, cfg: FedConfig) -> None:
        atomic_write_bytes(self.run_dir / "config.yaml",
                           yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode())

    def append(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")


def _dice_line(metrics: dict[str, float]) -> str:
    parts = [f"{r} {metrics[f'dice-{r}']:.3f}" for r in REGIONS if f"dice-{r}" in metrics]
    return ", ".join(parts) if parts else "no annotated region"


def run_federation(grid: Grid, cfg: FedConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Run the configured rounds on ``grid``; write checkpoints and metrics into ``run_dir``.

    Returns:
        The final per-site evaluation metrics and the number of completed rounds.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    runlog = RunLog(run_dir)
    runlog.write_config(cfg)
    strategy: Strategy = build_strategy(cfg)
    arrays = initial_shared_arrays(cfg)
    start_round = 1
    final_eval: dict[str, dict[str, float]] = {}
    if resume:
        ckpt = load_latest_checkpoint(run_dir)
        if ckpt is None:
            say(f"--resume: no intact checkpoint in {run_dir}; starting at round 1")
        else:
            if set(ckpt["arrays"]) != set(arrays):
                msg = f"{run_dir}: checkpoint keys do not match the configured model and policy"
                raise RuntimeError(msg)
            arrays = {k: v.float() for k, v in ckpt["arrays"].items()}
            load_strategy_state(strategy, ckpt["strategy"])
            final_eval = ckpt.get("eval", {})
            start_round = int(ckpt["round"]) + 1
            say(f"resuming after round {ckpt['round']} from {run_dir / 'checkpoints'}")
    fed = cfg.federation
    nbytes = sum(v.numel() * 4 for v in arrays.values())
    say(f"federation {cfg.name!r}: policy {fed.policy}, strategy {fed.strategy}, "
        f"{len(arrays)} shared tensors ({nbytes / 1e6:.2f} MB per site per round), "
        f"rounds {start_round}..{fed.rounds}")
    known: dict[int, str] = {}
    for rnd in range(start_round, fed.rounds + 1):
        t0 = time.perf_counter()
        nodes = wait_for_sites(grid, fed.min_sites, len(cfg.sites), fed.wait_for_sites_s)
        spec = RoundSpec.from_fed(cfg, rnd)
        record = ConfigRecord(spec.to_record())
        messages = list(strategy.configure_train(rnd, ArrayRecord(arrays), record, grid))
        say(f"[round {rnd}/{fed.rounds}] training at {len(messages)} of {len(cfg.sites)} sites "
            f"({len(nodes)} connected)")
        replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout_s))
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        good: list[Message] = []
        for msg in replies:
            name = site_name(msg, known, reply_node(msg, sent))
            reason = check_reply(msg, arrays, fed.max_update_norm)
            if reason is None:
                good.append(msg)
                m = dict(msg.content[METRICS])
                runlog.append({"round": rnd, "phase": "train", "site": name, **m})
                say(f"  {name}: loss {m['train-loss']:.4f}, {m['train-seconds']:.1f} s, "
                    f"{m['voxels-per-s'] / 1e6:.2f} Mvox/s, skipped cases {int(m['skipped-cases'])}")
            else:
                runlog.append({"round": rnd, "phase": "rejected", "site": name, "reason": reason})
                say(f"  {name}: update rejected: {reason}")
        answered = {reply_node(m, sent) for m in replies}
        for msg in messages:
            if msg.metadata.dst_node_id not in answered:
                name = known.get(msg.metadata.dst_node_id, f"node-{msg.metadata.dst_node_id}")
                runlog.append({"round": rnd, "phase": "timeout", "site": name})
                say(f"  {name}: no answer within {fed.round_timeout_s:.0f} s; skipped this round")
        if len(good) >= fed.min_sites:
            agg, _ = strategy.aggregate_train(rnd, good)
            if agg is not None:
                arrays = {k: v.float() for k, v in agg.to_torch_state_dict().items()}
            epsilon = privacy_spent(strategy)
            if epsilon is not None:
                runlog.append({"round": rnd, "phase": "privacy", "epsilon": epsilon,
                               "delta": fed.dp.target_delta})
                say(f"  privacy spent so far: epsilon {epsilon:.3f} at delta {fed.dp.target_delta:g}")
        else:
            say(f"  only {len(good)} usable updates (< min_sites {fed.min_sites}); "
                "the global arrays stay as they were")
        if rnd % fed.eval_every == 0 or rnd == fed.rounds:
            final_eval = _evaluate_round(grid, strategy, rnd, arrays, record, fed.round_timeout_s,
                                         runlog, known)
        elapsed = time.perf_counter() - t0
        runlog.append({"round": rnd, "phase": "round", "seconds": elapsed, "sites": len(good)})
        save_checkpoint(run_dir, rnd, {"arrays": arrays, "strategy": strategy_state(strategy),
                                       "eval": final_eval, "policy": fed.policy})
        say(f"[round {rnd}/{fed.rounds}] done in {elapsed:.1f} s; checkpoint written")
    save_payload(run_dir / "final_shared.ckpt", {
        "arrays": arrays, "policy": fed.policy, "model": config_to_dict(cfg)["model"],
        "rounds": fed.rounds, "name": cfg.name})
    atomic_write_bytes(run_dir / "final_metrics.json", json.dumps(final_eval, indent=2).encode())
    say(format_site_table(final_eval))
    return {"eval": final_eval, "rounds": fed.rounds}


def _evaluate_round(grid: Grid, strategy: Strategy, rnd: int, arrays: dict[str, torch.Tensor],
                    record: ConfigRecord, timeout: float, runlog: RunLog,
                    known: dict[int, str]) -> dict[str, dict[str, float]]:
    messages = list(strategy.configure_evaluate(rnd, ArrayRecord(arrays), record, grid))
    replies: Iterable[Message] = list(grid.send_and_receive(messages, timeout=timeout))
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
    per_site: dict[str, dict[str, float]] = {}
    for msg in replies:
        name = site_name(msg, known, reply_node(msg, sent))
        if msg.has_error():
            say(f"  {name}: evaluation failed: {msg.error.reason}")
            continue
        try:
            m = {k: float(v) for k, v in dict(msg.content[METRICS]).items()}
        except (KeyError, TypeError, ValueError):
            # A malformed evaluation reply costs that site its row, not the run.
            say(f"  {name}: evaluation reply malformed; ignored")
            continue
        per_site[name] = m
        runlog.append({"round": rnd, "phase": "eval", "site": name, **m})
        say(f"  {name}: Dice {_dice_line(m)}")
    return per_site


def format_site_table(per_site: dict[str, dict[str, float]]) -> str:
    """The per-site Dice table printed at the end of a run."""
    head = f"{'site':<14}" + "".join(f"{r:>8}" for r in REGIONS) + f"{'mean':>8}"
    lines = ["", "Dice of each site's personalized model on its validation cases", head,
             "-" * len(head)]
    means = []
    for site in sorted(per_site):
        m = per_site[site]
        cells = "".join(f"{m[f'dice-{r}']:>8.3f}" if f"dice-{r}" in m else f"{'-':>8}" for r in REGIONS)
        mean = m.get("dice-mean", float("nan"))
        means.append(mean)
        lines.append(f"{site:<14}{cells}{mean:>8.3f}")
    if means:
        lines.append(f"{'all sites':<14}{'':>24}{sum(means) / len(means):>8.3f}")
    return "\n".join(lines)
