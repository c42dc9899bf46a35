"""Run specs: the seed's ImageNet recipe is accepted as written; mistakes are named with their line."""

import dataclasses
import json
from pathlib import Path

import pytest

from hivemindd.wire.spec import (
    MAX_SPEC_BYTES,
    AveragingSpec,
    CheckpointSpec,
    DataSpec,
    ModelSpec,
    OptimizerSpec,
    RunSection,
    RunSpec,
    SpecError,
    ValidationSpec,
    parse_json,
    parse_toml,
)
from hivemindd.wire.spec_reference import reference_markdown

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


# --- issue 11 item 6: hostile specs have bounds ------------------------------------------------

BASE = "[data]\ntrain = 'a.tar'\ntrain_samples = 100\n"


@pytest.mark.parametrize(("extra", "key"), [
    ("[model]\nnum_classes = 1e9\n", r"model\.num_classes: must be between 2 and 100000 classes, got 1000000000"),
    ("[optimizer]\nlr = inf\n", r"optimizer\.lr: must be a finite number"),
    ("[optimizer]\nlr = nan\n", r"optimizer\.lr: must be a finite number"),
    ("[optimizer]\nmilestones = [30, inf]\n", r"optimizer\.milestones: must be a finite number"),
    ("[optimizer]\nwarmup_epochs = 1e300\n", r"optimizer\.warmup_epochs: must be in \[0, 100000\]"),
    ("[optimizer]\ntarget_batch_size = 99999999999999999999\n", r"optimizer\.target_batch_size"),
    ("[averaging]\naveraging_timeout = inf\n", r"averaging\.averaging_timeout: must be a finite number"),
    ("[averaging]\nmatchmaking_time = 1e9\n", r"averaging\.matchmaking_time: must be in \(0, 600\] seconds"),
    ("[averaging]\ngroup_size = 100000000\n", r"averaging\.group_size"),
    ("[checkpoint]\nevery_steps = 10000000000000\n", r"checkpoint\.every_steps"),
    ("[validation]\nbatches = 10000000000000\n", r"validation\.batches"),
    ("[run]\nmax_epochs = inf\n", r"run\.max_epochs: must be a finite number"),
])
def test_every_number_has_finite_bounds(extra: str, key: str) -> None:
    with pytest.raises(SpecError, match=key):
        parse_toml(BASE + extra, "s.toml")


def test_a_published_spec_with_infinity_or_a_huge_number_is_refused() -> None:
    good = parse_toml(BASE).to_dict()
    for section, key, value in (("optimizer", "lr", float("inf")), ("data", "train_samples", 10**400),
                                ("averaging", "alpha", float("nan"))):
        raw = json.loads(json.dumps(good))
        raw[section][key] = value
        with pytest.raises(SpecError, match=rf"{section}\.{key}"):
            parse_json(json.dumps(raw))  # Infinity / NaN are what json.dumps writes for them


@pytest.mark.parametrize("location", [
    "/dev/zero", "file:///dev/zero", "/proc/self/environ", "/sys/kernel/notes", "/data/../proc/1/environ",
    "//dev/stdin", "file:///proc/self/fd/0",
])
@pytest.mark.parametrize("key", ["train", "val", "classes"])
def test_data_locations_may_not_name_the_kernels_or_devices_files(location: str, key: str) -> None:
    spec = {"data": {"train": "a.tar", "train_samples": 10, key: location}}
    with pytest.raises(SpecError, match=rf"data\.{key}: .* is under /(dev|proc|sys): a run spec may not read"):
        RunSpec.from_dict(spec)


def test_pretrained_weights_may_not_come_from_dev() -> None:
    with pytest.raises(SpecError, match=r"model\.pretrained: '/dev/stdin' is under /dev"):
        RunSpec.from_dict({"model": {"pretrained": "/dev/stdin"}, "data": {"train": "a.tar", "train_samples": 10}})


def test_a_spec_larger_than_the_cap_is_refused_unparsed() -> None:
    text = BASE + "# " + "x" * (MAX_SPEC_BYTES + 1) + "\n"
    with pytest.raises(SpecError, match=rf"too large for a run spec \(at most {MAX_SPEC_BYTES}\)"):
        parse_toml(text, "big.toml")
    with pytest.raises(SpecError, match="too large"):
        parse_json(b" " * (MAX_SPEC_BYTES + 1) + b"{}")
    with pytest.raises(SpecError, match=r"data\.train: 3000 characters is too long"):
        RunSpec.from_dict({"data": {"train": "a" * 3000, "train_samples": 10}})


def test_a_deeply_nested_spec_is_a_spec_error_not_a_crash() -> None:
    with pytest.raises(SpecError, match=r"nested too deeply|not valid JSON"):
        parse_json("[" * 30_000 + "]" * 30_000)
    with pytest.raises(SpecError, match="nested too deeply"):
        parse_toml("a = " + "[" * 30_000 + "]" * 30_000)


# --- issue 11 item 8: no control characters in spec strings ----------------------------------

@pytest.mark.parametrize("value", ["a\x1b[2J.tar", "a.tar\nINFO forged line", "a\r.tar", "a\u202e.tar", "a\x00"])
def test_control_characters_in_spec_strings_are_refused(value: str) -> None:
    with pytest.raises(SpecError, match=r"data\.train: contains the control character U\+"):
        RunSpec.from_dict({"data": {"train": value, "train_samples": 10}})
    with pytest.raises(SpecError, match=r"model\.arch: contains the control character"):
        RunSpec.from_dict({"model": {"arch": value}, "data": {"train": "a.tar", "train_samples": 10}})


def test_an_unknown_key_with_escapes_is_named_without_them() -> None:
    with pytest.raises(SpecError) as err:
        RunSpec.from_dict({"data\x1b[31m": {}})
    assert "\x1b" not in str(err.value) and "\\x1b" in str(err.value)


# --- issue 10 item 4: the reference, and a missing [data] -------------------------------------

def test_a_spec_without_data_says_the_key_is_required() -> None:
    with pytest.raises(SpecError, match=r"^m\.toml: data\.train: is required: the \[data\] section must say"):
        parse_toml("[model]\narch = 'resnet18'\nnum_classes = 10\n", "m.toml")
    with pytest.raises(SpecError, match=r"data\.train_samples: is required"):
        parse_toml("[data]\ntrain = 'a.tar'\n", "m.toml")


def test_the_committed_spec_reference_is_generated_from_the_spec() -> None:
    committed = (Path(__file__).resolve().parents[1] / "docs" / "spec.md").read_text()
    assert committed == reference_markdown(), "docs/spec.md is stale: python -m hivemindd.wire.spec_reference > docs/spec.md"


def test_the_reference_names_every_key_with_its_default_and_unit() -> None:
    text = reference_markdown()
    for section_name, section_cls in (("model", ModelSpec), ("data", DataSpec), ("optimizer", OptimizerSpec),
                                      ("averaging", AveragingSpec), ("checkpoint", CheckpointSpec),
                                      ("validation", ValidationSpec), ("run", RunSection)):
        assert f"## [{section_name}]" in text
        for f in dataclasses.fields(section_cls):
            assert f"| `{f.name}` |" in text, f.name
            assert f.metadata["doc"], f"{section_name}.{f.name} has no doc"
    assert "| `max_epochs` | `0.0` | dataset epochs | [0, 100000] |" in text
    assert "| `lr` | `0.1` | – | (0, 100] |" in text
    assert "final.pt" in text and "last milestone" in text


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_every_example_fits_the_bounds(example: str) -> None:
    parse_toml((EXAMPLES / example).read_text(), example)
