"""The ClientApp: a thin adapter from Flower messages to :class:`SiteRuntime`.

A site is identified by its node config: ``site-config`` (the path of its site.yaml) in a
deployment, or ``partition-id`` into the run's ``sites`` list in a simulation. The reply
holds the shared arrays, scalar metrics and the site's name; never a path, file or case.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from uharmony_fed.fed.audit import payload_audit_mod
from uharmony_fed.fed.site_runtime import SiteRuntime, get_runtime
from uharmony_fed.fed.wire import ARRAYS, CONFIG, METRICS, SITE, RoundSpec

log = logging.getLogger(__name__)

#: The one key under which a site keeps its local state in ``context.state``.
STATE_KEY = "uharmony-local"

# Every reply passes the payload audit: only the shared keys, numbers and the site name leave.
app = ClientApp(mods=[payload_audit_mod])


def site_config_path(context: Context) -> Path:
    """The site.yaml of this node, from its node config (or its simulation partition)."""
    node = context.node_config
    if "site-config" in node:
        return Path(str(node["site-config"]))
    sites = str(context.run_config["sites"]).split(",")
    site = sites[int(node["partition-id"])]
    return Path(str(context.run_config["data-root"])) / site / "site.yaml"


def _prepare(msg: Message, context: Context) -> tuple[SiteRuntime, RoundSpec]:
    threads = int(context.run_config.get("threads-per-site", 0))
    if threads > 0:
        torch.set_num_threads(threads)
    spec = RoundSpec.from_record(dict(msg.content[CONFIG]))
    runtime = get_runtime(site_config_path(context), spec,
                          progress=bool(context.run_config.get("progress", False)))
    runtime.restore_state(_state_from_context(context))
    runtime.load_global(msg.content[ARRAYS].to_torch_state_dict())
    return runtime, spec


def _state_to_context(context: Context, payload: dict) -> None:
    # The node keeps the local tensors and counters in memory; the optimizer state is
    # only mirrored on disk (it is large and a fresh one is harmless).
    context.state[STATE_KEY] = ArrayRecord({k: v.contiguous() for k, v in payload["local"].items()})
    context.state[STATE_KEY + "-meta"] = ConfigRecord({"round": payload["round"], "step": payload["step"]})


def _state_from_context(context: Context) -> dict | None:
    if STATE_KEY not in context.state:
        return None
    meta = context.state[STATE_KEY + "-meta"]
    return {"round": int(meta["round"]), "step": int(meta["step"]),
            "local": context.state[STATE_KEY].to_torch_state_dict(), "optimizer": None}


def _reply(msg: Message, runtime: SiteRuntime, metrics: dict[str, float], arrays: bool) -> Message:
    content = RecordDict({METRICS: MetricRecord(metrics),
                          SITE: ConfigRecord({"name": runtime.site.name})})
    if arrays:
        content[ARRAYS] = ArrayRecord(runtime.shared_tensors())
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Merge the global shared arrays, train locally, save local state, reply."""
    runtime, spec = _prepare(msg, context)
    metrics = runtime.train_round(spec)
    _state_to_context(context, runtime.save_state(spec.server_round))
    return _reply(msg, runtime, metrics, arrays=True)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the personalized model (global shared + local) on the validation split."""
    runtime, spec = _prepare(msg, context)
    return _reply(msg, runtime, runtime.evaluate(spec), arrays=False)
