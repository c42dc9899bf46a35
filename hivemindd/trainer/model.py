"""The model (a torchvision classifier, never downloaded weights) and the device it runs on."""

from __future__ import annotations

import difflib
import logging
import os

import torch
import torchvision
from torch import nn

from hivemindd.trainer.errors import ConfigError

log = logging.getLogger(__name__)


def build_model(arch: str, num_classes: int, image_size: int) -> nn.Module:
    """A randomly initialised torchvision classifier; ConfigError if ``arch`` cannot be trained here."""
    known = torchvision.models.list_models(module=torchvision.models)  # classifiers only
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"model.arch: {arch!r} is not a torchvision model{hint}")
    try:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.arch: cannot build {arch!r} with {num_classes} classes: {exc}") from None
    _check_forward(model, arch, image_size)
    return model


def _check_forward(model: nn.Module, arch: str, image_size: int) -> None:
    # Some architectures reject small inputs (inception_v3 needs >= 75 px); say so now rather
    # than crash-looping on the first batch.
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    except (RuntimeError, ValueError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"data.image_size: {arch} cannot take {image_size}x{image_size} images ({message})") from None
    finally:
        model.train()


def select_device(setting: str) -> torch.device:
    """``auto`` → cuda, else mps, else cpu; an explicit device must exist."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if setting == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if setting == "cuda" and not cuda:
        raise ConfigError("host.device: 'cuda' was asked for but torch sees no CUDA GPU (use 'auto' or 'cpu')")
    if setting == "mps" and not mps:
        raise ConfigError("host.device: 'mps' was asked for but torch sees no Apple GPU (use 'auto' or 'cpu')")
    if setting not in ("cuda", "mps", "cpu"):
        raise ConfigError(f"host.device: {setting!r} is not one of auto, cuda, mps, cpu")
    return torch.device(setting)


def set_cpu_threads(device: torch.device) -> int:
    """Leave one core to hivemind when training on the CPU; returns torch's thread count.

    hivemind's DHT and averager processes take a fair share of a core. With as many
    torch threads as cores the threads wait on each other: on 2 cores shufflenet ran
    at ~220 samples/s with 2 threads and ~390 with 1. An explicit OMP_NUM_THREADS wins.
    """
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
    return torch.get_num_threads()


def batchnorm_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Floating-point BatchNorm statistics: hivemind averages and shares these only as extra tensors."""
    buffers = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for tensor in (module.running_mean, module.running_var):
                if tensor is not None and tensor.is_floating_point():
                    buffers.append(tensor)
    return buffers
