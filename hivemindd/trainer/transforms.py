"""Image transforms (uint8 on the loader side, normalised on the device) and a background prefetcher.

Loader workers (or the prefetch thread) only decode, crop and flip, and hand over
uint8 CHW tensors: a quarter of the bytes of float32 through the worker queues and
the host→device copy, and no per-pixel float arithmetic on the CPU. The device
turns a whole batch into normalised floats in one go (``DeviceNormalizer``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

import torch
from torchvision import transforms

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VAL_RESIZE_RATIO = 256 / 224  # ImageNet: resize to 256, centre-crop 224

T = TypeVar("T")


def train_transform(image_size: int, augment: str = "random-resized-crop") -> transforms.Compose:
    """Training augmentation (``[data] augment``) → uint8 CHW tensor.

    ``random-resized-crop``: the ImageNet standard, RandomResizedCrop + horizontal flip.
    ``crop-flip``: the CIFAR standard, resize, pad by 1/8 of the size, random crop, flip.
    ``none``: resize only.
    """
    if augment == "random-resized-crop":
        steps: list[object] = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    elif augment == "crop-flip":
        steps = [transforms.Resize(image_size), transforms.CenterCrop(image_size),
                 transforms.RandomCrop(image_size, padding=max(1, image_size // 8)), transforms.RandomHorizontalFlip()]
    elif augment == "none":
        steps = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    else:
        raise ValueError(f"data.augment: {augment!r} is not an augmentation")
    return transforms.Compose([rgb, *steps, transforms.PILToTensor()])


def val_transform(image_size: int) -> transforms.Compose:
    """Deterministic: resize the short side to ``image_size × 256/224``, centre crop → uint8 CHW tensor."""
    return transforms.Compose([
        rgb,
        transforms.Resize(round(image_size * VAL_RESIZE_RATIO)),
        transforms.CenterCrop(image_size),
        transforms.PILToTensor(),
    ])


def rgb(image: object) -> object:
    """Grey, palette and RGBA images become RGB (a model's first layer takes three channels)."""
    convert = getattr(image, "convert", None)
    mode = getattr(image, "mode", "RGB")
    return convert("RGB") if convert is not None and mode != "RGB" else image


class DeviceNormalizer:
    """uint8 NCHW batch on the host → normalised float batch on the device (channels_last when asked)."""

    def __init__(self, device: torch.device, channels_last: bool = False) -> None:
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = images.float().sub_(self.mean).mul_(self.inv_std)
        return images.contiguous(memory_format=self.memory_format)


class _End:
    """Marks the end of the producer's iterator in the queue."""


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Prefetcher(Generic[T]):
    """Runs ``source`` in a background thread, ``depth`` items ahead of the consumer.

    For ``workers = 0`` (macOS/MPS, where forked loader workers are unsafe): decoding
    and augmenting the next batches overlaps with the training step. The producer's
    exception is re-raised in the consumer, in order, after the items before it. An
    exhausted source ends the iteration. ``close()`` (also on garbage collection and
    at the end of a ``with``) stops the thread even while it is blocked on a full
    queue, and never waits on a producer stuck inside ``source`` for longer than
    ``join_timeout_s`` (the thread is a daemon and dies with the process).
    """

    def __init__(self, source: Iterator[T], depth: int = 2, name: str = "prefetch", join_timeout_s: float = 5.0) -> None:
        self._source = source
        self._queue: queue.Queue[T | _End | _Failure] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._done = False
        self._join_timeout_s = join_timeout_s
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
        except BaseException as exc:
            self._put(_Failure(exc))
            return
        self._put(_End())

    def _put(self, item: T | _End | _Failure) -> bool:
        """Blocks while the queue is full; False once the consumer closed us."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True  # the producer vanished without a word (cannot happen, but never hang)
                    raise RuntimeError("the prefetch thread ended without a result") from None
        if isinstance(item, _End):
            self._done = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True
            raise item.exc
        return item

    def close(self) -> None:
        """Stop the producer and wait (briefly) for its thread to end."""
        self._done = True
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self._join_timeout_s)
            if self._thread.is_alive():
                log.warning("prefetch thread %s still busy in its source after %.0fs; leaving it (daemon)",
                            self._thread.name, self._join_timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._stop.is_set():
            self._stop.set()  # no join from a finaliser: it may run on the producer thread itself
