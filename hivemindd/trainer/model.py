"""The model (a torchvision classifier, never downloaded weights), the device it runs on, and its precision."""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from hivemindd.trainer import read_policy
from hivemindd.trainer.errors import ConfigError

log = logging.getLogger(__name__)


# torchvision ResNets with a stem for 32x32 images (3x3 stride-1 conv, no max-pool), as in He et al.'s
# CIFAR experiments: the ImageNet stem shrinks 32 px to 8 px before the first block and costs ~5 points.
SMALL_IMAGE_ARCHS = {f"{name}_cifar": name for name in ("resnet18", "resnet34", "resnet50")}


def _small_image_resnet(base: str, num_classes: int) -> nn.Module:
    model = torchvision.models.get_model(base, weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_model(arch: str, num_classes: int, image_size: int, pretrained: str = "") -> nn.Module:
    """A torchvision classifier, random or loaded from ``pretrained`` (a local file); ConfigError if unusable."""
    known = torchvision.models.list_models(module=torchvision.models)  # classifiers only
    if arch in SMALL_IMAGE_ARCHS:
        model = _small_image_resnet(SMALL_IMAGE_ARCHS[arch], num_classes)
        if pretrained:
            load_pretrained(model, pretrained, arch, num_classes)
        _check_forward(model, arch, image_size)
        return model
    if arch not in known:
        close = difflib.get_close_matches(arch, [*known, *SMALL_IMAGE_ARCHS], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"model.arch: {arch!r} is not a torchvision model{hint}")
    try:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.arch: cannot build {arch!r} with {num_classes} classes: {exc}") from None
    if pretrained:
        load_pretrained(model, pretrained, arch, num_classes)
    _check_forward(model, arch, image_size)
    return model


def load_pretrained(model: nn.Module, location: str, arch: str, num_classes: int) -> None:
    """Load weights from a local file: a state dict, or a checkpoint/dict holding one under "model"/"state_dict".

    Nothing is ever downloaded. Every tensor must fit: a file made for another
    architecture or another number of classes is a ConfigError naming what differs.
    """
    path = Path(location.removeprefix("file://")).expanduser()
    try:
        read_policy.current().check_local(path)  # not the state dir, /dev, …, nor outside [host] data_roots
    except read_policy.ReadRefused as exc:
        raise ConfigError(f"model.pretrained: {exc}") from None
    if not path.is_file():
        raise ConfigError(f"model.pretrained: {location} is not a file on this host (weights are never downloaded)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise ConfigError(f"model.pretrained: {path} is not a torch weights file ({_first_line(exc)})") from None
    state = _state_dict_in(raw)
    if state is None:
        raise ConfigError(f"model.pretrained: {path} holds no state dict (expected tensors by parameter name)")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"model.pretrained: {path} does not fit {arch} with {num_classes} classes "
                          f"({_first_line(exc)})") from None
    log.info("loaded pretrained weights from %s", path)


def _state_dict_in(raw: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(raw, dict):
        for key in ("model", "state_dict"):
            if isinstance(raw.get(key), dict):
                raw = raw[key]
                break
        if raw and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw.items()):
            # weights saved from a DistributedDataParallel or torch.compile wrapper carry a prefix
            for prefix in ("module.", "_orig_mod."):
                if all(k.startswith(prefix) for k in raw):
                    raw = {k.removeprefix(prefix): v for k, v in raw.items()}
            return raw
    return None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


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
    """``auto`` → mps, else cuda, else cpu (the seed's order; no machine has both); an explicit device must exist."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if setting == "auto":
        return torch.device("mps" if mps else "cuda" if cuda else "cpu")
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


@dataclass(frozen=True)
class Precision:
    """How the forward/backward pass runs on this device.

    CUDA: autocast to bf16 where the GPU has it (Ampere and newer; no loss scaling
    needed), else fp16 with a GradScaler; channels_last memory format; TF32 matmuls
    and convolutions. CPU and MPS: full fp32 (CPU autocast is slower than fp32 for
    convolutions on most CPUs, and MPS autocast is incomplete).
    """

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    @property
    def needs_grad_scaler(self) -> bool:
        return self.amp_dtype is torch.float16

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def describe(self) -> str:
        dtype = str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype is not None else "fp32"
        return f"{dtype}{' channels_last' if self.channels_last else ''}"


def select_precision(device: torch.device) -> Precision:
    """The fastest safe precision for ``device``; turns TF32 on for CUDA."""
    if device.type != "cuda":
        return Precision(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels once
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return Precision(device, amp_dtype=dtype, channels_last=True)
