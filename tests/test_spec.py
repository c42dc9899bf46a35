"""Run specs: the seed's ImageNet recipe is accepted as written; mistakes are named with their line."""

from pathlib import Path

import pytest

from hivemindd.spec import RunSpec, SpecError, parse_json, parse_toml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_imagenet_example_is_accepted_as_written() -> None:
    spec = parse_toml((EXAMPLES / "imagenet-resnet50.toml").read_text(), "imagenet-resnet50.toml")
    assert spec.model.arch == "resnet50" and spec.model.num_classes == 1000
    assert spec.data.train == "gs://caso-estudio-2/imagenet-wds/train/train-{000000..000640}.tar"
    assert spec.optimizer.milestones == (30, 60, 90)
    assert spec.optimizer.target_batch_size == 4096
    assert spec.checkpoint.every_steps == 200 and spec.validation.batches == 50


def test_demo_example_is_valid() -> None:
    spec = parse_toml((EXAMPLES / "demo.toml").read_text(), "demo.toml")
    assert spec.data.train.startswith("demo://")


def test_milestones_convert_dataset_epochs_to_global_steps() -> None:
    spec = parse_toml((EXAMPLES / "imagenet-resnet50.toml").read_text())
    # 1,281,167 samples / 4,096 per global step = 312.78 steps per dataset epoch
    assert spec.milestones_in_global_steps() == [9384, 18767, 28151]


def test_json_round_trip_is_identical() -> None:
    spec = parse_toml((EXAMPLES / "imagenet-resnet50.toml").read_text())
    assert parse_json(spec.to_json()) == spec


def test_typo_in_key_is_named_with_line_and_suggestion() -> None:
    text = "[model]\narch = 'resnet18'\nnum_classes = 10\n[optimizer]\nmomentun = 0.9\n[data]\ntrain='x'\ntrain_samples=10\n"
    with pytest.raises(SpecError) as err:
        parse_toml(text, "mine.toml")
    assert "mine.toml:5" in str(err.value)
    assert "optimizer.momentun" in str(err.value) and "momentum" in str(err.value)


def test_unknown_section_is_named() -> None:
    with pytest.raises(SpecError, match=r"x.toml:1: unknown section \[modle\].*'model'"):
        parse_toml("[modle]\narch='resnet50'\n", "x.toml")


def test_wrong_type_is_named_with_line() -> None:
    text = "[data]\ntrain = 'a.tar'\ntrain_samples = 'many'\n"
    with pytest.raises(SpecError, match=r"s.toml:3: data.train_samples: expected integer"):
        parse_toml(text, "s.toml")


def test_bad_value_is_named() -> None:
    text = "[data]\ntrain = 'a.tar'\ntrain_samples = 100\n[optimizer]\nmomentum = 1.5\n"
    with pytest.raises(SpecError, match=r"s.toml:5: optimizer.momentum: must be in \[0, 1\)"):
        parse_toml(text, "s.toml")


def test_toml_syntax_error_is_reported() -> None:
    with pytest.raises(SpecError, match="not valid TOML"):
        parse_toml("[model\narch=", "broken.toml")


@pytest.mark.parametrize(("section", "key"), [
    ("[averaging]\nstrategy = 'allreduce'\n", r"averaging\.strategy"),
    ("[averaging]\nstrategy = 'gossip'\nalpha = 0.0\n", r"averaging\.alpha"),
    ("[averaging]\nstrategy = 'gossip'\nalpha = 1.5\n", r"averaging\.alpha"),
    ("[averaging]\ngroup_size = 4\nmin_group_size = 5\n", r"averaging\.min_group_size"),
    ("[optimizer]\nlr_scaling = 'sqrt'\n", r"optimizer\.lr_scaling"),
    ("[optimizer]\nwarmup_epochs = -1\n", r"optimizer\.warmup_epochs"),
    ("[run]\nmax_epochs = -2\n", r"run\.max_epochs"),
])
def test_bad_strategy_and_schedule_values_are_refused_by_key(section: str, key: str) -> None:
    text = "[data]\ntrain = 'a.tar'\ntrain_samples = 100\n" + section
    with pytest.raises(SpecError, match=key):
        parse_toml(text)


def test_gossip_spec_is_accepted_with_defaults() -> None:
    spec = parse_toml("[data]\ntrain = 'a.tar'\ntrain_samples = 100\n[averaging]\nstrategy = 'gossip'\n")
    assert (spec.averaging.group_size, spec.averaging.min_group_size, spec.averaging.alpha) == (16, 2, 1.0)


def test_garbage_published_spec_is_refused() -> None:
    with pytest.raises(SpecError, match="not valid JSON"):
        parse_json(b"\x00garbage")
    with pytest.raises(SpecError, match="version"):
        parse_json('{"version": 99}')
    with pytest.raises(SpecError, match="table of sections"):
        RunSpec.from_dict([1, 2])
