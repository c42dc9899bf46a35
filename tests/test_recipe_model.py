"""Model building: pretrained weights from a local file (never downloaded), devices, precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hivemindd.trainer.errors import ConfigError
from hivemindd.trainer.model import build_model, select_device, select_precision


def test_pretrained_weights_load_from_a_local_file(tmp_path: Path) -> None:
    source = build_model("resnet18_cifar", 10, 32)
    path = tmp_path / "weights.pt"
    torch.save({"model": source.state_dict(), "step": 3}, path)  # a checkpoint-shaped file works too
    loaded = build_model("resnet18_cifar", 10, 32, pretrained=str(path))
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_pretrained_weights_with_a_module_prefix(tmp_path: Path) -> None:
    source = build_model("shufflenet_v2_x0_5", 10, 32)
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    loaded = build_model("shufflenet_v2_x0_5", 10, 32, pretrained=f"file://{path}")
    assert torch.equal(loaded.state_dict()["fc.weight"], source.state_dict()["fc.weight"])


@pytest.mark.parametrize(("make", "message"), [
    (None, "model.pretrained: {path} is not a file on this host"),
    (lambda p: p.write_bytes(b"not torch"), "model.pretrained: {path} is not a torch weights file"),
    (lambda p: torch.save({"step": 1}, p), "model.pretrained: {path} holds no state dict"),
    (lambda p: torch.save(build_model("shufflenet_v2_x0_5", 100, 32).state_dict(), p),
     "model.pretrained: {path} does not fit shufflenet_v2_x0_5 with 10 classes"),
])
def test_unusable_pretrained_weights_are_a_config_error(tmp_path: Path, make: object, message: str) -> None:
    path = tmp_path / "w.pt"
    if make is not None:
        make(path)  # type: ignore[operator]
    before = path.read_bytes() if path.exists() else None
    with pytest.raises(ConfigError) as caught:
        build_model("shufflenet_v2_x0_5", 10, 32, pretrained=str(path))
    assert str(caught.value).startswith(message.format(path=path))
    assert (path.read_bytes() if path.exists() else None) == before  # the file is left as it was


def test_devices_and_precision() -> None:
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    assert select_device("auto").type == ("mps" if mps else "cuda" if cuda else "cpu")  # the seed's order
    assert select_device("cpu") == torch.device("cpu")
    if not cuda:
        with pytest.raises(ConfigError, match=r"host\.device: 'cuda' was asked for"):
            select_device("cuda")
    precision = select_precision(torch.device("cpu"))
    assert precision.amp_dtype is None and not precision.channels_last and precision.describe() == "fp32"
    if cuda:
        gpu = select_precision(torch.device("cuda"))
        assert gpu.channels_last and gpu.amp_dtype in (torch.bfloat16, torch.float16)
        assert torch.backends.cuda.matmul.allow_tf32
