"""Every ready-made run spec in examples/ parses, and its model builds for its image size."""

from __future__ import annotations

from pathlib import Path

import pytest

import hivemindd
from hivemindd.trainer.model import build_model
from hivemindd.wire.spec import parse_toml

EXAMPLES = sorted((Path(hivemindd.__file__).parent / "examples").glob("*.toml"))


def test_the_seed_data_sets_have_specs() -> None:
    assert {"cifar10.toml", "tiny-imagenet.toml", "imagenet-resnet50.toml", "demo.toml"} <= {p.name for p in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_parses_and_its_model_builds(path: Path) -> None:
    spec = parse_toml(path.read_text(), source=path.name)
    assert spec.milestones_in_global_steps()
    build_model(spec.model.arch, spec.model.num_classes, spec.data.image_size)
