"""The run the daemon tests train, as spec TOML: one base, and the changes a test needs on top.

Small enough for two trainers on two cores: resnet18 on 32×32 demo shapes, a checkpoint every
5 steps, validation that never comes in a test's lifetime. Trainer-only tests (no daemon) keep
their own launch-level spec in tests/test_trainer_process.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

TEST_RUN: dict[str, dict[str, Any]] = {
    "model": {"arch": "resnet18", "num_classes": 10},
    "data": {"train": "demo://shapes/train", "val": "demo://shapes/val", "train_samples": 2000, "image_size": 32},
    "optimizer": {"lr": 0.05, "target_batch_size": 64, "milestones": [30]},
    "averaging": {"matchmaking_time": 1.0, "averaging_timeout": 10.0},
    "checkpoint": {"every_steps": 5},
    "validation": {"every_steps": 1000, "batches": 2},
}


def spec_toml(changes: Mapping[str, Mapping[str, Any] | None] | None = None) -> str:
    """TEST_RUN as TOML with ``changes`` ({section: {key: value}}) applied.

    A value of None removes that key, a section of None the whole section; keys a test adds
    come after the section's own, in the order given.
    """
    run = {section: dict(values) for section, values in TEST_RUN.items()}
    for section, values in (changes or {}).items():
        if values is None:
            run.pop(section, None)
            continue
        table = run.setdefault(section, {})
        for key, value in values.items():
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
    lines = []
    for section, table in run.items():
        if table:
            lines.append(f"[{section}]")
            lines.extend(f"{key} = {_toml(value)}" for key, value in table.items())
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r} in a test spec")
