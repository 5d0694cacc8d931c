"""Atomic, checksummed files for server checkpoints and site state.

A write goes to a temporary file in the same folder, is fsynced, and is renamed over the
target, so a process killed mid-write leaves the previous file intact. Each payload is
stored with its SHA-256 in a small header, so a file damaged on disk is detected on load
rather than silently trained on.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_MAGIC = b"UHFED1\n"


class CorruptFileError(RuntimeError):
    """A checkpoint or state file fails its checksum or cannot be parsed."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half.

    Raises:
        OSError: the disk is full or the folder is not writable; the old file is kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_payload(path: Path, payload: dict[str, Any]) -> None:
    """Serialize ``payload`` with torch, prefix its checksum, and write it atomically."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    digest = hashlib.sha256(body).hexdigest().encode()
    atomic_write_bytes(path, _MAGIC + digest + b"\n" + body)


def load_payload(path: Path) -> dict[str, Any]:
    """Read a file written by :func:`save_payload`, verifying its checksum.

    Raises:
        FileNotFoundError: there is no such file.
        CorruptFileError: the file is truncated, altered, or not ours.
    """
    raw = Path(path).read_bytes()
    head = len(_MAGIC)
    if not raw.startswith(_MAGIC) or len(raw) < head + 65:
        msg = f"{path}: not a uharmony-fed checkpoint (bad header); delete it or restore a backup"
        raise CorruptFileError(msg)
    digest, body = raw[head : head + 64], raw[head + 65 :]
    if hashlib.sha256(body).hexdigest().encode() != digest:
        msg = f"{path}: checksum mismatch (file truncated or altered); delete it or restore a backup"
        raise CorruptFileError(msg)
    return torch.load(io.BytesIO(body), map_location="cpu", weights_only=False)


_CKPT = re.compile(r"^round-(\d{4,})\.ckpt$")


def checkpoint_path(run_dir: Path, server_round: int) -> Path:
    """The file of the checkpoint written after ``server_round``."""
    return Path(run_dir) / "checkpoints" / f"round-{server_round:04d}.ckpt"


def save_checkpoint(run_dir: Path, server_round: int, payload: dict[str, Any], keep: int = 3) -> Path:
    """Write the checkpoint of a completed round and prune all but the newest ``keep``."""
    path = checkpoint_path(run_dir, server_round)
    save_payload(path, {"round": server_round, **payload})
    rounds = sorted(_checkpoint_rounds(run_dir))
    for old in rounds[:-keep] if keep > 0 else []:
        checkpoint_path(run_dir, old).unlink(missing_ok=True)
    # A writer killed mid-write leaves its temporary file behind (as large as a
    # checkpoint); only one server writes a run folder, so any other one is stale.
    for stale in path.parent.glob(".round-*.ckpt.tmp-*"):
        if not stale.name.endswith(f"-{os.getpid()}"):
            stale.unlink(missing_ok=True)
    return path


def _checkpoint_rounds(run_dir: Path) -> list[int]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return [int(m.group(1)) for p in folder.iterdir() if (m := _CKPT.match(p.name))]


def load_latest_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The newest intact checkpoint of a run, skipping (and logging) damaged ones."""
    for server_round in sorted(_checkpoint_rounds(run_dir), reverse=True):
        path = checkpoint_path(run_dir, server_round)
        try:
            return load_payload(path)
        except CorruptFileError as exc:
            log.warning("skipping damaged checkpoint: %s", exc)
    return None
