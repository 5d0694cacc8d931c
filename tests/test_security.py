"""Hostile or broken updates: the server's reply checks, and robust aggregation under poisoning.

Replies are real Flower ``Message`` objects built in-process (no Flower process runs), so
these tests exercise the same ``check_reply`` and the same strategies' ``aggregate_train``
as a deployment does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from uharmony_fed.data import load_site_config
from uharmony_fed.fed.server_loop import check_reply, initial_shared_arrays
from uharmony_fed.fed.site_runtime import TRAIN_METRICS, SiteRuntime
from uharmony_fed.fed.strategies import build_strategy
from uharmony_fed.fed.wire import ARRAYS, METRICS, SITE, RoundSpec
from uharmony_fed.fedconfig import FedConfig, load_config

REPO = Path(__file__).resolve().parents[1]
SITES = ("hospitalA", "hospitalB", "hospitalC")


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    """Flower stamps new messages with the task's identity; give the test process one."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def instruction(node_id: int, arrays: dict[str, torch.Tensor]) -> Message:
    """The server's train message to one node."""
    return Message(RecordDict({ARRAYS: ArrayRecord(arrays)}), dst_node_id=node_id, message_type="train")


def reply(to: Message, arrays: dict[str, torch.Tensor], site: str = "hospitalA",
          **metrics: float) -> Message:
    """A site's train reply, built the way the ClientApp builds it."""
    values = {"num-examples": 4.0, "unit-weight": 1.0, "train-loss": 0.5, "train-seconds": 1.0, "voxels-per-s": 1e6,
              "skipped-cases": 0.0, **metrics}
    return Message(RecordDict({ARRAYS: ArrayRecord({k: v.contiguous() for k, v in arrays.items()}),
                               METRICS: MetricRecord(values), SITE: ConfigRecord({"name": site})}),
                   reply_to=to)


GLOBAL = {"enc.weight": torch.zeros(3, 2), "enc.bias": torch.zeros(3)}


def _with(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**{k: v + 0.01 for k, v in GLOBAL.items()}, key: value}


def test_a_sound_reply_passes() -> None:
    msg = reply(instruction(5, GLOBAL), {k: v + 0.01 for k, v in GLOBAL.items()})
    assert check_reply(msg, GLOBAL, max_update_norm=1.0) is None
    assert set(TRAIN_METRICS) == set(msg.content[METRICS].keys())


def _extra_array_record() -> Message:
    msg = reply(instruction(5, GLOBAL), GLOBAL)
    msg.content["smuggled"] = ArrayRecord({"x": torch.ones(1)})
    return msg


def _extra_metric_record() -> Message:
    msg = reply(instruction(5, GLOBAL), GLOBAL)
    msg.content["more"] = MetricRecord({"x": 1.0})
    return msg


def _no_metrics() -> Message:
    return Message(RecordDict({ARRAYS: ArrayRecord(GLOBAL)}), reply_to=instruction(5, GLOBAL))


def _num_examples_missing() -> Message:
    msg = reply(instruction(5, GLOBAL), GLOBAL)
    del msg.content[METRICS]["num-examples"]
    return msg


# Each hostile or broken reply, and the words its rejection reason must contain.
BAD_REPLIES = {
    "nan": (lambda: reply(instruction(5, GLOBAL), _with("enc.bias", torch.tensor([0.0, float("nan"), 0.0]))),
            "non-finite"),
    "inf": (lambda: reply(instruction(5, GLOBAL), _with("enc.weight", torch.full((3, 2), float("inf")))),
            "non-finite"),
    "missing key": (lambda: reply(instruction(5, GLOBAL), {"enc.weight": GLOBAL["enc.weight"]}),
                    "missing ['enc.bias']"),
    "extra key": (lambda: reply(instruction(5, GLOBAL), _with("head.weight", torch.zeros(2))),
                  "unexpected ['head.weight']"),
    "wrong shape": (lambda: reply(instruction(5, GLOBAL), _with("enc.weight", torch.zeros(2, 3))),
                    "shape (2, 3) != (3, 2)"),
    "norm over bound": (lambda: reply(instruction(5, GLOBAL), _with("enc.weight", torch.full((3, 2), 100.0))),
                        "exceeds federation.max_update_norm"),
    "num-examples missing": (_num_examples_missing, "missing"),
    "num-examples zero": (lambda: reply(instruction(5, GLOBAL), GLOBAL, **{"num-examples": 0.0}),
                          "not a finite positive"),
    "num-examples nan": (lambda: reply(instruction(5, GLOBAL), GLOBAL, **{"num-examples": float("nan")}),
                         "not a finite positive"),
    "num-examples inf": (lambda: reply(instruction(5, GLOBAL), GLOBAL, **{"num-examples": float("inf")}),
                         "not a finite positive"),
    "metric list": (lambda: reply(instruction(5, GLOBAL), GLOBAL, **{"train-loss": [1.0, 2.0]}),
                    "not a scalar"),
    "extra metric": (lambda: reply(instruction(5, GLOBAL), GLOBAL, note=1.0), "['note'] unexpected"),
    "extra array record": (_extra_array_record, "extra records"),
    "extra metric record": (_extra_metric_record, "extra records"),
    "no metrics": (_no_metrics, "lacks its arrays or metrics"),
    "error reply": (lambda: Message(Error(code=2, reason="site hospitalB: disk full"),
                                    reply_to=instruction(5, GLOBAL)), "disk full"),
}


@pytest.mark.parametrize("case", list(BAD_REPLIES))
def test_check_reply_rejects(case: str) -> None:
    make, words = BAD_REPLIES[case]
    reason = check_reply(make(), GLOBAL, max_update_norm=10.0)
    assert reason is not None and words in reason, reason


def test_undecodable_arrays_are_rejected_not_raised() -> None:
    msg = reply(instruction(5, GLOBAL), GLOBAL)
    good = msg.content[ARRAYS]["enc.bias"]
    msg.content[ARRAYS]["enc.bias"] = Array(dtype=good.dtype, shape=good.shape, stype=good.stype,
                                            data=b"\x00garbage")
    reason = check_reply(msg, GLOBAL, max_update_norm=0.0)
    assert reason is not None and "decoded" in reason


# -- one poisoned site among three: robust aggregation keeps the model ---------------------------


def bench_config(root: Path, strategy: str) -> FedConfig:
    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides={
        "data": {"spacing": [6.0, 6.0, 6.0]},
        "train": {"local_steps": 25, "lr": 0.01, "amp": False, "device": "cpu"},
        "federation": {"rounds": 5, "strategy": strategy}})
    return replace(cfg, data_root=root, demo=None)


def federate(root: Path, strategy: str, attacker: str | None, rounds: int = 5) -> float:
    """Train ``rounds`` rounds in-process; return the honest sites' mean Dice at the end.

    Each site is a real :class:`SiteRuntime` on its demo data; every round's replies are
    Flower Messages passed through ``check_reply`` (without a norm bound, so only the
    strategy stands between the attacker and the model) and the strategy's own
    ``aggregate_train``. The attacker trains like the others, then sends its update
    sign-flipped, scaled by 20 and buried in noise (std 3).
    """
    cfg = bench_config(root, strategy)
    strategy_obj = build_strategy(cfg)
    arrays = initial_shared_arrays(cfg)
    spec = RoundSpec.from_fed(cfg, 1)
    runtimes = {s: SiteRuntime(load_site_config(root / s / "site.yaml"), spec) for s in cfg.sites}
    gen = torch.Generator().manual_seed(0)
    for rnd in range(1, rounds + 1):
        spec = RoundSpec.from_fed(cfg, rnd)
        replies = []
        for node, (site, rt) in enumerate(runtimes.items(), start=1):
            rt.load_global(arrays)
            metrics = rt.train_round(spec)
            sent = rt.shared_tensors()
            if site == attacker:
                sent = {k: arrays[k] - 20.0 * (v - arrays[k]) + 3.0 * torch.randn(v.shape, generator=gen)
                        for k, v in sent.items()}
            msg = reply(instruction(node, arrays), sent, site, **metrics)
            assert check_reply(msg, arrays, max_update_norm=0.0) is None
            replies.append(msg)
        agg, _ = strategy_obj.aggregate_train(rnd, replies)
        assert agg is not None
        arrays = {k: v.float() for k, v in agg.to_torch_state_dict().items()}
    dice = []
    for site, rt in runtimes.items():
        if site != attacker:
            rt.load_global(arrays)
            dice.append(rt.evaluate(spec)["dice-mean"])
    return sum(dice) / len(dice)


@pytest.mark.slow
def test_one_poisoned_site_among_three(tiny_demo: Path, capsys) -> None:
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    clean = federate(tiny_demo, "fedavg", attacker=None)
    poisoned_avg = federate(tiny_demo, "fedavg", attacker="hospitalB")
    poisoned_median = federate(tiny_demo, "fedmedian", attacker="hospitalB")
    with capsys.disabled():
        print(f"\nmean Dice of the honest sites (hospitalA, hospitalC) after 5 rounds: "
              f"clean FedAvg {clean:.3f}, poisoned FedAvg {poisoned_avg:.3f}, "
              f"poisoned FedMedian {poisoned_median:.3f}")
    assert clean > 0.2, "the clean run did not learn; the comparison would mean nothing"
    assert poisoned_avg < 0.5 * clean
    assert poisoned_median > 0.7 * clean


# -- identity and transport -----------------------------------------------------------------------


@pytest.mark.slow
def test_unenrolled_site_and_wrong_ca_are_refused(tmp_path: Path) -> None:
    """A TLS SuperLink with site keys: a site whose key was not enrolled when the server
    started is refused, a site that trusts another CA cannot connect, and no private key
    is written into the run folder or any log."""
    import re

    import yaml

    from loopback import kill_tree, start_server, wait_for
    from uharmony_fed.certs import make_certs
    from uharmony_fed.fed.launch import _REFUSED, site_node_config
    from uharmony_fed.fed.runtime import free_port, start_supernode
    from uharmony_fed.fedconfig import config_to_dict

    certs, other = tmp_path / "certs", tmp_path / "other-ca"
    make_certs(certs, hosts=("localhost", "127.0.0.1"), sites=SITES)
    make_certs(other, hosts=("localhost", "127.0.0.1"), sites=("hospitalC",))
    # hospitalC's key exists but the coordinator never enrolled it.
    (certs / "sites" / "hospitalC.key.pub").rename(tmp_path / "hospitalC.key.pub")
    port = free_port()
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    cfg = replace(cfg, name=f"sec{port}", data_root=tmp_path / "no-data", demo=None,
                  server=replace(cfg.server, host="127.0.0.1", port=port, certs_dir=certs))
    cfg_path = tmp_path / "fed.yaml"
    cfg_path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    server = start_server(cfg_path, run_dir)
    nodes = []
    try:
        conf = site_node_config("hospitalC", tmp_path / "site.yaml")
        unenrolled = start_supernode(f"127.0.0.1:{port}", free_port(), conf, tmp_path / "unenrolled.log",
                                     ca_cert=certs / "ca.crt", auth_key=certs / "sites" / "hospitalC.key",
                                     max_retries=2, max_wait_time=20)
        wrong_ca = start_supernode(f"127.0.0.1:{port}", free_port(), conf, tmp_path / "wrong-ca.log",
                                   ca_cert=other / "ca.crt", auth_key=other / "sites" / "hospitalC.key",
                                   max_retries=2, max_wait_time=20)
        nodes += [unenrolled, wrong_ca]
        for node in nodes:
            wait_for(lambda n=node: bool(_REFUSED.search(n.log_path.read_text(errors="replace")))
                      or n.proc.poll() is not None, 90, f"{node.log_path.name} to be refused", server)
        unenrolled_log = (tmp_path / "unenrolled.log").read_text(errors="replace")
        wrong_ca_log = (tmp_path / "wrong-ca.log").read_text(errors="replace")
        assert re.search(r"PERMISSION_DENIED|UNAUTHENTICATED|not authorized|Failed to activate",
                         unenrolled_log, re.IGNORECASE), unenrolled_log[-2000:]
        assert re.search(r"certificate verify failed|CERTIFICATE_VERIFY_FAILED|handshake|SSL|UNAVAILABLE",
                         wrong_ca_log, re.IGNORECASE), wrong_ca_log[-2000:]
        # Neither ever ran a ClientApp.
        assert "Receiving: train" not in unenrolled_log + wrong_ca_log
    finally:
        for node in nodes:
            node.stop()
        kill_tree(server)
    leaked = [p for p in [*run_dir.rglob("*"), *tmp_path.glob("*.log")]
              if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
    assert not leaked, leaked


# -- differential privacy on the shared update ----------------------------------------------------


class _Grid:
    """Just enough of a Flower Grid for a strategy's configure_train: three connected nodes."""

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def test_server_side_dp_clips_every_update(tmp_path: Path) -> None:
    from uharmony_fed.checkpoint import load_payload, save_checkpoint
    from uharmony_fed.fed.strategies import strategy_state

    cfg = load_config(overrides={"federation": {"dp": {"mode": "server-fixed", "noise_multiplier": 0.0,
                                                       "clipping_norm": 0.5}}})
    strategy = build_strategy(cfg)
    messages = list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord({}), _Grid()))
    assert len(messages) == 3
    # Three sites send updates of norm 100; clipped to 0.5 each, their mean moves by <= 0.5.
    replies = [reply(m, {k: v + 100.0 / 3 for k, v in GLOBAL.items()}) for m in messages]
    agg, _ = strategy.aggregate_train(1, replies)
    assert agg is not None
    update = torch.cat([v.flatten() for v in agg.to_torch_state_dict().values()])
    assert 0.49 < float(update.norm()) <= 0.5 + 1e-5
    save_checkpoint(tmp_path, 1, {"strategy": strategy_state(strategy)})  # the wrapper checkpoints
    assert load_payload(tmp_path / "checkpoints" / "round-0001.ckpt")["strategy"]["clipping_norm"] == 0.5


def test_accounted_dp_reports_growing_epsilon_and_checkpoints_it(tmp_path: Path) -> None:
    """Server-side DP with noise: Flower's RDP accountant reports epsilon after every round."""
    from uharmony_fed.checkpoint import load_payload, save_checkpoint
    from uharmony_fed.fed.strategies import load_strategy_state, privacy_spent, strategy_state

    cfg = load_config(overrides={"federation": {"dp": {"mode": "server-fixed", "noise_multiplier": 1.0,
                                                       "clipping_norm": 0.5, "target_delta": 1e-5}}})
    strategy = build_strategy(cfg)
    spent = []
    for rnd in (1, 2):
        messages = list(strategy.configure_train(rnd, ArrayRecord(GLOBAL), ConfigRecord({}), _Grid()))
        # Unequal example counts: accounted aggregation weights sites equally (unit-weight).
        replies = [reply(m, {k: v + 1.0 for k, v in GLOBAL.items()}, **{"num-examples": 3.0 + i})
                   for i, m in enumerate(messages)]
        agg, _ = strategy.aggregate_train(rnd, replies)
        assert agg is not None
        spent.append(privacy_spent(strategy))
    assert spent[0] is not None and 0 < spent[0] < spent[1]
    save_checkpoint(tmp_path, 2, {"strategy": strategy_state(strategy)})
    fresh = build_strategy(cfg)
    load_strategy_state(fresh, load_payload(tmp_path / "checkpoints" / "round-0002.ckpt")["strategy"])
    assert privacy_spent(fresh) == pytest.approx(spent[1])


def test_client_side_dp_clips_before_the_update_leaves(tiny_demo: Path, tmp_path: Path) -> None:
    """The real ClientApp, asked by the client-side wrapper's config key, clips its update."""
    import yaml
    from flwr.app import Context
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from uharmony_fed.fed import client_app
    from uharmony_fed.fed.wire import CONFIG

    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides={
        "data_root": str(tiny_demo), "data": {"spacing": [6.0, 6.0, 6.0]},
        "train": {"amp": False, "device": "cpu", "lr": 0.05},
        "federation": {"dp": {"mode": "client-fixed", "clipping_norm": 0.01}}})
    assert type(build_strategy(cfg)).__name__ == "DifferentialPrivacyClientSideFixedClipping"
    conf = yaml.safe_load((tiny_demo / "hospitalA" / "site.yaml").read_text())
    conf.update(data_dir=str(tiny_demo / "hospitalA" / conf["data_dir"]), state_dir=str(tmp_path / "state"))
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(conf))
    arrays = initial_shared_arrays(cfg)
    record = {**RoundSpec.from_fed(cfg, 1).to_record(), KEY_CLIPPING_NORM: 0.01}
    msg = Message(RecordDict({ARRAYS: ArrayRecord(arrays), CONFIG: ConfigRecord(record)}),
                  dst_node_id=1, message_type="train")
    ctx = Context(run_id=1, node_id=1, node_config={"site": "hospitalA", "site-config": str(tmp_path / "site.yaml")},
                  state=RecordDict(), run_config={})
    out = client_app.app(msg, ctx)
    assert not out.has_error(), out.error.reason if out.has_error() else ""
    sent = out.content[ARRAYS].to_torch_state_dict()
    norm = sum(float(((sent[k] - arrays[k]) ** 2).sum()) for k in arrays) ** 0.5
    assert 0.0 < norm <= 0.01 + 1e-5
