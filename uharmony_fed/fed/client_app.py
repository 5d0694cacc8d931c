"""The ClientApp: a thin adapter from Flower messages to :class:`SiteRuntime`.

A site is identified by its node config: ``site-config`` (the path of its site.yaml) in a
deployment, or ``partition-id`` into the run's ``sites`` list in a simulation. The reply
holds the shared arrays, scalar metrics and the site's name; never a path, file or case.
"""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import Callable
from functools import wraps
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from uharmony_fed.fed.audit import SUSPECT, payload_audit_mod
from uharmony_fed.fed.site_runtime import SiteRuntime, get_runtime
from uharmony_fed.fed.wire import ARRAYS, CONFIG, METRICS, SITE, RoundSpec

log = logging.getLogger(__name__)

#: The one key under which a site keeps its local state in ``context.state``.
STATE_KEY = "uharmony-local"

def clip_if_asked_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: Flower's ``fixedclipping_mod`` when the server asks for clipping.

    The server's client-side DP wrapper puts the clipping norm in the round's config; the
    mod itself fails on messages without it, so it only runs when the norm is there.
    """
    configs = msg.content.config_records
    if CONFIG in configs and KEY_CLIPPING_NORM in configs[CONFIG]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


# Every reply passes the payload audit (outermost, so it sees the clipped update): only the
# shared keys, numbers and the site name leave.
app = ClientApp(mods=[payload_audit_mod, clip_if_asked_mod])


def site_config_path(context: Context) -> Path:
    """The site.yaml of this node, from its node config (or its simulation partition)."""
    node = context.node_config
    if "site-config" in node:
        return Path(str(node["site-config"]))
    sites = str(context.run_config["sites"]).split(",")
    site = sites[int(node["partition-id"])]
    return Path(str(context.run_config["data-root"])) / site / "site.yaml"


def _prepare(msg: Message, context: Context) -> tuple[SiteRuntime, RoundSpec]:
    # A site's own setting (node config, `client --threads`) wins over the simulation's.
    threads = int(context.node_config.get("threads", context.run_config.get("threads-per-site", 0)))
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


#: Flower's code for "the ClientApp raised an exception" (flwr.common.constant.ErrorCode).
CLIENT_APP_RAISED_EXCEPTION = 2


def site_label(context: Context) -> str:
    """The site's name for messages: node config ``site`` or the simulation's site list."""
    node = context.node_config
    if "site" in node:
        return str(node["site"])
    try:
        return str(context.run_config["sites"]).split(",")[int(node["partition-id"])]
    except (KeyError, IndexError, ValueError):
        return "unknown site"


def wire_reason(site: str, exc: BaseException) -> str:
    """The error text that may leave the site: the kind of failure, never a path or case id.

    The full message (with the file and the fix) stays in the site's own log; words that
    look like a path, a file or a case id are replaced here, because an error reply
    crosses the wire like any other and the payload audit does not see exceptions.
    """
    kind = type(exc).__name__
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        kind = "disk full (ENOSPC)"
    text = " ".join("<path>" if SUSPECT.search(w) else w for w in str(exc).split())
    text = re.sub(r"(<path>\s*)+", "<path> ", text).strip()
    return f"site {site}: {kind}: {text} (the site's log names the file)"


def fail_cleanly(fn: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Turn an exception in a round into one clear error reply; the round goes on elsewhere."""

    @wraps(fn)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return fn(msg, context)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error reply
            site = site_label(context)
            log.error("site %s: %s round failed: %s", site, msg.metadata.message_type, exc)
            return Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=wire_reason(site, exc)),
                           reply_to=msg)

    return wrapper


@app.train()
@fail_cleanly
def train(msg: Message, context: Context) -> Message:
    """Merge the global shared arrays, train locally, save local state, reply."""
    runtime, spec = _prepare(msg, context)
    metrics = runtime.train_round(spec)
    _state_to_context(context, runtime.save_state(spec.server_round))
    return _reply(msg, runtime, metrics, arrays=True)


@app.evaluate()
@fail_cleanly
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the personalized model (global shared + local) on the validation split."""
    runtime, spec = _prepare(msg, context)
    return _reply(msg, runtime, runtime.evaluate(spec), arrays=False)
