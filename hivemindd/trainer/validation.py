"""Validation: loss, top-1 and top-5 of the model on the val shards, the same images every time.

The val shards are read in the order the spec lists them, samples in file order,
never resampled or shuffled, so two passes (on two hosts, or before and after a
restart) score the same images. ``[validation] batches`` limits a pass to its
first N batches (0: all of them). Small val sets (up to ``CACHE_BYTES`` of uint8
pixels) are kept in memory after the first pass, so later passes cost only the
forward passes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hivemindd.trainer.data import Batch, val_batches
from hivemindd.trainer.model import Precision
from hivemindd.trainer.transforms import DeviceNormalizer

log = logging.getLogger(__name__)

CACHE_BYTES = 512 << 20


@dataclass(frozen=True)
class Scores:
    loss: float
    top1: float
    top5: float
    samples: int


class Validator:
    """Scores a model on a fixed prefix (``batches``) of the val set; see the module docstring."""

    def __init__(self, shards: list[str], image_size: int, batch_size: int, batches: int, *,
                 location: str = "", classes: list[str] | None = None) -> None:
        self._open: Callable[[], Iterator[Batch]] = lambda: val_batches(
            shards, image_size, batch_size, location=location, classes=classes)
        self._limit = batches
        self._cache: list[Batch] | None = None

    def _batches(self) -> Iterator[Batch]:
        if self._cache is not None:
            yield from self._cache
            return
        kept: list[Batch] | None = []
        size = 0
        stream = self._open()
        try:
            for n, batch in enumerate(stream):
                if self._limit and n >= self._limit:
                    break
                if kept is not None:
                    size += batch[0].numel() * batch[0].element_size()
                    if size <= CACHE_BYTES:
                        kept.append(batch)
                    else:
                        kept = None  # too big to keep: stream it again next time
                yield batch
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        if kept is not None:
            self._cache = kept

    @torch.no_grad()
    def score(self, model: nn.Module, normalize: DeviceNormalizer, precision: Precision) -> Scores:
        """Evaluate in eval mode (BatchNorm running statistics) and put the model back in train mode."""
        was_training = model.training
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=normalize.device)
        top1 = torch.zeros((), dtype=torch.int64, device=normalize.device)
        top5 = torch.zeros((), dtype=torch.int64, device=normalize.device)
        samples = 0
        try:
            for images, labels in self._batches():
                x = normalize(images)
                y = labels.to(normalize.device, non_blocking=True)
                with precision.autocast():
                    logits = model(x)
                logits = logits.float()
                loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
                k = min(5, logits.shape[1])
                best = logits.topk(k, dim=1).indices
                hits = best.eq(y.unsqueeze(1))
                top1 += hits[:, 0].sum()
                top5 += hits.any(dim=1).sum()
                samples += int(labels.shape[0])
        finally:
            model.train(was_training)
        if samples == 0:
            raise ValueError("the val set yielded no samples")
        return Scores(loss=float(loss_sum) / samples, top1=int(top1) / samples, top5=int(top5) / samples,
                      samples=samples)
