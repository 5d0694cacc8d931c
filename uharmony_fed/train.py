"""Local training and sliding-window validation of one site's model (no Flower here)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import DataLoader, MetaTensor
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from torch import nn
from tqdm.auto import tqdm

from uharmony_fed import REGIONS
from uharmony_fed.model import region_loss


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` takes the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer named in the train config, over every trainable parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.99, nesterov=True, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def scheduled_lr(base_lr: float, schedule: str, step: int, total_steps: int) -> float:
    """Learning rate at global local step ``step`` of ``total_steps`` (cosine or constant)."""
    if schedule == "constant" or total_steps <= 0:
        return base_lr
    frac = min(step / total_steps, 1.0)
    return base_lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def _forever(loader: DataLoader) -> Iterator[dict]:
    while True:
        yield from loader


@dataclass
class StepStats:
    """What one call of :func:`train_steps` measured."""

    steps: int
    loss: float
    seconds: float
    voxels_per_s: float


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_tensor() if isinstance(t, MetaTensor) else t


def train_steps(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    device: torch.device,
    lr: float | Sequence[float] | None = None,
    prox_mu: float = 0.0,
    prox_ref: Mapping[str, torch.Tensor] | None = None,
    amp: bool = True,
    progress: bool = True,
    desc: str = "train",
) -> StepStats:
    """Run ``steps`` optimizer steps on batches drawn from ``loader``.

    Args:
        model: the site's full model (shared + local parts).
        loader: yields dicts with ``image`` (N,C,...), ``label`` (N,3,...) and
            ``annotated`` (N,3); the loss counts only annotated regions.
        optimizer: the optimizer over the model's parameters.
        steps: number of optimizer steps.
        device: where to train.
        lr: the learning rate for these steps (one value, or one per step).
        prox_mu: FedProx coefficient; with ``prox_ref`` adds mu/2 * ||w - w_ref||^2 over
            the parameters named in ``prox_ref`` (the shared ones).
        prox_ref: the round's global values of the shared parameters.
        amp: use autocast (bfloat16) on CUDA.
        progress: show a progress bar.
        desc: the bar's label.

    Returns:
        Mean loss, wall time and voxels per second of the steps.
    """
    model.train()
    if device.type == "cpu":
        # Late in a run, gradients and optimizer moments reach subnormal floats, which
        # x86 CPUs compute tens of times slower; flushing them to zero changes nothing else.
        torch.set_flush_denormal(True)
    named = dict(model.named_parameters())
    prox_pairs = []
    if prox_mu > 0 and prox_ref:
        prox_pairs = [(named[k], v.to(device)) for k, v in prox_ref.items() if k in named]
    use_amp = amp and device.type == "cuda"
    batches = _forever(loader)
    losses: list[float] = []
    voxels = 0
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, mininterval=2.0)
    for i in bar:
        if lr is not None:
            step_lr = lr[i] if isinstance(lr, Sequence) else lr
            for group in optimizer.param_groups:
                group["lr"] = step_lr
        batch = next(batches)
        # Plain tensors: MONAI's MetaTensor would route every op of the step through
        # its __torch_function__ (metadata is not needed to train).
        image = _plain(batch["image"]).to(device)
        label = _plain(batch["label"]).to(device)
        annotated = _plain(batch["annotated"]).to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(image)
        loss = region_loss(logits.float(), label, annotated)
        if prox_pairs:
            loss = loss + 0.5 * prox_mu * sum(((p - r) ** 2).sum() for p, r in prox_pairs)
        if not torch.isfinite(loss):
            msg = f"{desc}: the loss became {loss.item()} at step {i}; lower train.lr"
            raise FloatingPointError(msg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        voxels += image[:, :1].numel()
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - start
    return StepStats(steps, float(np.mean(losses)), seconds, voxels / max(seconds, 1e-9))


@torch.no_grad()
def predict_volume(
    model: nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int],
    *,
    device: torch.device,
    sw_batch_size: int = 2,
    overlap: float = 0.25,
    amp: bool = True,
) -> torch.Tensor:
    """Region probabilities (N,3,...) of a whole volume by sliding-window inference."""
    model.eval()
    use_amp = amp and device.type == "cuda"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        logits = sliding_window_inference(
            image.to(device), tuple(roi_size), sw_batch_size, model, overlap=overlap, mode="gaussian"
        )
    return torch.sigmoid(logits.float())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Sequence[Mapping],
    roi_size: Sequence[int],
    *,
    device: torch.device,
    sw_batch_size: int = 2,
    overlap: float = 0.25,
    hd95: bool = False,
    amp: bool = True,
    progress: bool = False,
    classes: Sequence[str] = REGIONS,
) -> dict[str, float]:
    """Dice (and HD95 on request) per region over whole validation volumes.

    Only the regions each case's site annotates are scored. A case with an empty
    reference and an empty prediction scores Dice 1 for that region.

    Args:
        classes: the model's output channels (``SiteConfig.classes``): the regions, then
            a site's extra classes, which are scored but kept out of ``dice-mean``.

    Returns:
        ``{"dice-ET": ..., "dice-TC": ..., "dice-WT": ..., "dice-mean": ...}`` with the
        regions that were annotated, ``dice-<class>`` of extra classes, plus ``hd95-*``
        when asked and ``val-cases``.
    """
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none") if hd95 else None
    scores: dict[str, list[float]] = {r: [] for r in classes}
    dists: dict[str, list[float]] = {r: [] for r in classes}
    for item in tqdm(dataset, desc="validate", disable=not progress, leave=False):
        image = _plain(item["image"]).unsqueeze(0)
        label = _plain(item["label"]).unsqueeze(0).to(device)
        annotated = item["annotated"]
        pred = (predict_volume(model, image, roi_size, device=device, sw_batch_size=sw_batch_size,
                               overlap=overlap, amp=amp) > 0.5).float()
        # A model may have fewer outputs than the site's classes (a universal or another
        # site's model has no output for this site's extra classes): score what it predicts.
        n = min(pred.shape[1], len(classes))
        pred, label = pred[:, :n], label[:, :n]
        per_region = dice(pred, label)[0]
        dists_row = hd(pred, label)[0] if hd is not None else None
        for j, region in enumerate(classes[:n]):
            if annotated[j] > 0:
                scores[region].append(float(per_region[j]))
                if dists_row is not None and math.isfinite(float(dists_row[j])):
                    dists[region].append(float(dists_row[j]))
    out: dict[str, float] = {}
    for region in classes:
        if scores[region]:
            out[f"dice-{region}"] = float(np.mean(scores[region]))
        if dists[region]:
            out[f"hd95-{region}"] = float(np.mean(dists[region]))
    regional = [out[f"dice-{r}"] for r in REGIONS if f"dice-{r}" in out]
    if regional:
        out["dice-mean"] = float(np.mean(regional))
    out["val-cases"] = float(len(dataset))
    return out
