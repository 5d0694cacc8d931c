"""One site's side of a round, in plain PyTorch: state, merge, train, evaluate, reply.

The ClientApp is a thin adapter around :class:`SiteRuntime`; the benchmark calls the
same class directly to time the same local steps without Flower.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.utils import set_determinism

from uharmony_fed.checkpoint import CorruptFileError, load_payload, save_payload
from uharmony_fed.data import SiteConfig, build_datasets, data_loader, load_site_config
from uharmony_fed.fed.wire import RoundSpec
from uharmony_fed.model import build_model
from uharmony_fed.policy import canonical_state, get_policy, load_shared, split_keys
from uharmony_fed.train import evaluate, make_optimizer, pick_device, scheduled_lr, train_steps

log = logging.getLogger(__name__)


#: The metric names of every train reply; the server rejects replies with other names,
#: because Flower's strategies refuse to aggregate replies whose names differ.
#: ``unit-weight`` (always 1) is the aggregation weight when DP accounting asks for equal weights.
TRAIN_METRICS = ("num-examples", "unit-weight", "train-loss", "train-seconds", "voxels-per-s",
                 "skipped-cases")


class SiteStateError(RuntimeError):
    """The site's saved state does not fit the federation's current model or policy."""


@dataclass
class LocalState:
    """What a site keeps between rounds: never sent anywhere."""

    server_round: int
    step: int
    local: dict[str, torch.Tensor]
    optimizer: dict | None

    def to_payload(self) -> dict:
        return {"round": self.server_round, "step": self.step, "local": self.local,
                "optimizer": self.optimizer}

    @classmethod
    def from_payload(cls, payload: dict) -> LocalState:
        return cls(int(payload["round"]), int(payload["step"]), dict(payload["local"]),
                   payload["optimizer"])


class SiteRuntime:
    """A site's model, data and saved state for one federation.

    Args:
        site: the site's own config (data, label mapping, state folder).
        spec: the round settings the server sent (model, data, train, policy).
        progress: show progress bars.
    """

    def __init__(self, site: SiteConfig, spec: RoundSpec, progress: bool = False) -> None:
        self.site = site
        self.spec = spec
        self.progress = progress
        self.device = pick_device(spec.train.device)
        set_determinism(seed=spec.seed)
        self.model = build_model(spec.model, extra_classes=len(site.extra_classes)).to(self.device)
        self.policy = get_policy(spec.policy)
        if site.extra_classes and "head" not in self.policy.local_roles:
            msg = (f"site {site.name}: extra_classes {list(site.extra_classes)} need a site-local head, "
                   f"but policy {spec.policy!r} shares the head; use policy uharmony, fedper or local-only, "
                   "or remove extra_classes from site.yaml")
            raise ValueError(msg)
        self.shared_keys, self.local_keys = split_keys(self.model, self.policy)
        self.train_ds, self.val_ds, self.skipped = build_datasets(site, spec.data, spec.seed)
        if len(self.train_ds) == 0:
            msg = f"site {site.name}: no usable training case in {site.data_dir}; run check-data"
            raise RuntimeError(msg)
        self.loader = data_loader(self.train_ds, spec.data, train=True)
        self.optimizer = make_optimizer(self.model, spec.train.optimizer, spec.train.lr,
                                        spec.train.weight_decay)
        self.state = LocalState(0, 0, self.local_tensors(), self.optimizer.state_dict())
        self.state_path = Path(site.state_dir) / spec.federation / "local_state.ckpt"

    # -- state -----------------------------------------------------------------------
    def local_tensors(self) -> dict[str, torch.Tensor]:
        """Copies of the parameters this site keeps (its restore and head, per policy)."""
        canon = canonical_state(self.model)
        return {k: canon[k].detach().cpu().clone() for k in self.local_keys}

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        """Copies of exactly the parameters the policy sends to the server."""
        canon = canonical_state(self.model)
        return {k: canon[k].detach().cpu().clone() for k in self.shared_keys}

    def restore_state(self, memory: dict | None = None) -> LocalState:
        """Load the newest of the in-memory (node context) and on-disk local state.

        Raises:
            SiteStateError: the saved keys do not match this policy's local keys.
        """
        candidates = []
        if memory is not None:
            candidates.append((LocalState.from_payload(memory), 0))
        for rank, path in ((2, self.state_path), (1, self.previous_state_path)):
            if not path.is_file():
                continue
            try:
                candidates.append((LocalState.from_payload(load_payload(path)), rank))
            except CorruptFileError as exc:
                log.warning("site %s: %s; falling back to an older intact state", self.site.name, exc)
        if candidates:
            # Ties go to the newest disk copy, which also holds the optimizer state.
            best = max(candidates, key=lambda c: (c[0].server_round, c[1]))[0]
            if set(best.local) != set(self.local_keys):
                missing = sorted(set(self.local_keys) - set(best.local))[:3]
                extra = sorted(set(best.local) - set(self.local_keys))[:3]
                msg = (f"{self.state_path}: saved local state does not fit policy "
                       f"{self.policy.name!r} (missing {missing}, unexpected {extra}); "
                       f"move the folder away to start this site afresh")
                raise SiteStateError(msg)
            canon = canonical_state(self.model)
            with torch.no_grad():
                for key, value in best.local.items():
                    canon[key].copy_(value.to(canon[key].device))
            if best.optimizer is not None:
                try:
                    self.optimizer.load_state_dict(best.optimizer)
                except (ValueError, KeyError):
                    log.warning("site %s: optimizer state did not fit; reset", self.site.name)
            self.state = best
        return self.state

    def save_state(self, server_round: int) -> dict:
        """Write the local state atomically to the state folder; return its payload."""
        self.state = LocalState(server_round, self.state.step, self.local_tensors(),
                                self.optimizer.state_dict())
        payload = self.state.to_payload()
        # The last good file is kept one round back, so a file damaged on disk later
        # costs one round of local progress, not all of it. A kill between the two steps
        # leaves only the .prev file, which restore_state also reads.
        if self.state_path.is_file():
            os.replace(self.state_path, self.previous_state_path)
        save_payload(self.state_path, payload)
        # A process killed mid-write leaves its temporary file; one site writes this folder.
        for stale in self.state_path.parent.glob(f".{self.state_path.name}.tmp-*"):
            if not stale.name.endswith(f"-{os.getpid()}"):
                stale.unlink(missing_ok=True)
        return payload

    @property
    def previous_state_path(self) -> Path:
        """The state file of the round before, kept as a fallback."""
        return self.state_path.with_name(self.state_path.name + ".prev")

    # -- a round ---------------------------------------------------------------------
    def load_global(self, shared: dict[str, torch.Tensor]) -> None:
        """Merge the server's shared arrays; the keys must be exactly the shared set."""
        load_shared(self.model, shared, self.policy)

    def train_round(self, spec: RoundSpec) -> dict[str, float]:
        """Train the configured local steps; return the reply's scalar metrics."""
        steps = spec.train.local_steps
        total = spec.total_rounds * steps
        # The schedule follows the federation's round, not the site's own step count, so a
        # site that joins late (or missed rounds) decays with the others.
        start = (spec.server_round - 1) * steps
        lrs = [scheduled_lr(spec.train.lr, spec.train.schedule, start + i, total) for i in range(steps)]
        ref = None
        if spec.prox_mu > 0:
            ref = {k: v.detach().clone() for k, v in canonical_state(self.model).items()
                   if k in set(self.shared_keys)}
        frozen = self._warming_up(spec)
        if frozen:
            log.info("site %s: joining warm-up, round %d trains only the local part", self.site.name,
                     spec.server_round)
        for p in frozen:
            p.requires_grad_(False)
        try:
            stats = train_steps(self.model, self.loader, self.optimizer, steps, device=self.device,
                                lr=lrs, prox_mu=spec.prox_mu, prox_ref=ref, amp=spec.train.amp,
                                progress=self.progress, desc=f"{self.site.name} r{spec.server_round}")
        finally:
            for p in frozen:
                p.requires_grad_(True)
        self.state.step += steps
        return {
            "num-examples": float(len(self.train_ds)),
            "unit-weight": 1.0,
            "train-loss": stats.loss,
            "train-seconds": stats.seconds,
            "voxels-per-s": stats.voxels_per_s,
            "skipped-cases": float(len(self.skipped)),
        }

    def _warming_up(self, spec: RoundSpec) -> list[torch.nn.Parameter]:
        """The shared parameters to hold still this round: all of them while the site warms up after joining."""
        warm = spec.train.join_warmup_rounds
        joining = warm > 0 and spec.server_round > warm and self.state.step < warm * spec.train.local_steps
        if not joining:
            return []
        shared = set(self.shared_keys)
        return [p for k, p in self.model.named_parameters() if k in shared]

    def evaluate(self, spec: RoundSpec) -> dict[str, float]:
        """Dice per annotated region of the personalized model on the validation split."""
        start = time.perf_counter()
        out = evaluate(self.model, self.val_ds, spec.data.roi_size, device=self.device,
                       sw_batch_size=spec.train.sw_batch_size, overlap=spec.train.sw_overlap,
                       hd95=spec.train.hd95, amp=spec.train.amp, progress=self.progress,
                       classes=self.site.classes)
        out["eval-seconds"] = time.perf_counter() - start
        out["num-examples"] = float(max(len(self.val_ds), 1))
        return out


_CACHE: dict[tuple, SiteRuntime] = {}


def get_runtime(site_config: Path, spec: RoundSpec, progress: bool = False) -> SiteRuntime:
    """The site's runtime, built once per process and reused across rounds.

    The key holds everything that changes the model or the data, so a new federation or
    config builds a new runtime. Its state is still reloaded every round.
    """
    site = load_site_config(site_config)
    key = (str(Path(site_config).resolve()), spec.federation, spec.policy, repr(spec.model),
           repr(spec.data), spec.train.optimizer, spec.seed)
    if key not in _CACHE:
        _CACHE[key] = SiteRuntime(site, spec, progress=progress)
    runtime = _CACHE[key]
    runtime.spec = spec
    return runtime
