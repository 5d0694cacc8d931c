"""What leaves the building: a client mod that checks and logs every reply a site sends.

The server defines the exchange: a reply may carry back exactly the array keys the server
sent, numbers as metrics, and the site's name. The mod refuses any other reply (Flower
then sends an error instead of the payload), and, when asked, appends a summary of every
message in and out to a JSON-lines audit log at the site: keys, shapes, a digest of the
arrays, metric names and values, and every string. Nothing here reads image data.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from uharmony_fed.fed.wire import ARRAYS, SITE

#: Strings that look like a path, a file, or a BraTS-style case id never leave a site.
SUSPECT = re.compile(r"[/\\]|\.nii|\.gz|\.json|\.ya?ml|BraTS|case[-_]?\d", re.IGNORECASE)


class PayloadViolation(RuntimeError):
    """A reply would send something the exchange contract does not allow."""


def arrays_digest(record) -> str:
    """SHA-256 over the sorted keys and bytes of an ArrayRecord (order independent)."""
    h = hashlib.sha256()
    for key in sorted(record.keys()):
        h.update(key.encode())
        h.update(record[key].data)
    return h.hexdigest()


def summarize(msg: Message) -> dict:
    """A JSON-ready summary of a message's content (no array data)."""
    content = msg.content
    out: dict = {"type": msg.metadata.message_type, "arrays": {}, "metrics": {}, "configs": {}}
    for name, rec in content.array_records.items():
        out["arrays"][name] = {"keys": {k: list(rec[k].shape) for k in rec.keys()},
                               "digest": arrays_digest(rec)}
    for name, rec in content.metric_records.items():
        out["metrics"][name] = {k: v for k, v in rec.items()}
    for name, rec in content.config_records.items():
        out["configs"][name] = {k: v if isinstance(v, (int, float, bool)) else str(v)
                                for k, v in rec.items()}
    return out


def check_reply(incoming: Message, reply: Message) -> None:
    """Raise :class:`PayloadViolation` unless ``reply`` keeps the exchange contract."""
    if reply.has_error():
        return
    content = reply.content
    sent = set(incoming.content[ARRAYS].keys()) if ARRAYS in incoming.content.array_records else set()
    names = set(content.array_records.keys())
    if names - {ARRAYS}:
        raise PayloadViolation(f"unexpected array records {sorted(names - {ARRAYS})}")
    if ARRAYS in names:
        got = set(content[ARRAYS].keys())
        if got != sent:
            extra, missing = sorted(got - sent)[:5], sorted(sent - got)[:5]
            raise PayloadViolation(f"reply arrays differ from the shared set (extra {extra}, missing {missing})")
    for name, rec in content.metric_records.items():
        for key, value in rec.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise PayloadViolation(f"metric {name}.{key} is not a scalar number")
    extra_cfg = set(content.config_records.keys()) - {SITE}
    if extra_cfg:
        raise PayloadViolation(f"unexpected config records {sorted(extra_cfg)}")
    for name, rec in content.config_records.items():
        for key, value in rec.items():
            if key != "name" or not isinstance(value, str) or SUSPECT.search(value):
                raise PayloadViolation(f"config {name}.{key}={value!r} is not allowed to leave the site")


def _audit_path(context: Context) -> Path | None:
    node = context.node_config
    if "audit-log" in node and str(node["audit-log"]):
        return Path(str(node["audit-log"]))
    folder = str(context.run_config.get("audit-dir", ""))
    if folder:
        tag = node.get("site", node.get("partition-id", "site"))
        return Path(folder) / f"audit-{tag}.jsonl"
    return None


def payload_audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: enforce the exchange contract on every reply, and log both directions."""
    reply = call_next(msg, context)
    check_reply(msg, reply)
    path = _audit_path(context)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        row = {"time": time.time(), "in": summarize(msg), "out": summarize(reply)}
        with open(path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    return reply
