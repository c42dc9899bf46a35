"""``docs/spec.md``, generated from the spec's own keys: ``python -m hivemindd.wire.spec_reference > docs/spec.md``.

Every key's default, unit, bounds and meaning come from its ``_key(...)`` in spec.py, so
the reference cannot drift from what the parser accepts (a test compares it with the file).
"""

from __future__ import annotations

import sys
from typing import Any

from hivemindd.wire.spec import MAX_SPEC_BYTES, MAX_STRING_CHARS, SYSTEM_DIRS, plain_number, spec_keys


def reference_markdown() -> str:
    """``docs/spec.md``: every key of a run spec with its default, unit, allowed values and meaning."""
    out = [
        "# Run spec reference",
        "",
        "<!-- Generated from hivemindd/wire/spec.py by `python -m hivemindd.wire.spec_reference > docs/spec.md`; do not edit. -->",
        "",
        "A run spec is a TOML file (`hmctl join --run-id ID --spec FILE.toml`) with the sections below; every",
        "peer of a run trains with the same spec. Keys left out take their default; unknown keys, wrong types",
        "and values outside the allowed range are refused with the file, line and key. `[data] train` and",
        "`[data] train_samples` are required. Strings may not hold control characters and are at most",
        f"{MAX_STRING_CHARS} characters; a whole spec is at most {MAX_SPEC_BYTES // 1024} KiB. Data locations may not",
        f"lie under {', '.join(f'`{d}`' for d in SYSTEM_DIRS)}; a host may further refuse its own state directory,",
        "folders outside its `[host] data_roots`, and loopback or link-local URLs (unless its",
        "`[host] allow_local_urls` is true): those are the host's settings, not part of the spec.",
        "",
        "*Dataset epochs* count passes over `train_samples` samples; *global steps* (hivemind epochs) count",
        "`target_batch_size` samples from all peers; *local steps* are this host's own optimizer steps.",
        "To stop training at the end of a schedule, set `[run] max_epochs` to the last milestone.",
    ]
    current = ""
    for section, key, default, meta in spec_keys():
        if section != current:
            current = section
            out += ["", f"## [{section}]", "", "| key | default | unit | allowed | meaning |", "|---|---|---|---|---|"]
        out.append(f"| `{key}` | {_md_default(default)} | {meta['unit'] or '–'} | {_md_allowed(default, meta)} "
                   f"| {meta['doc']} |")
    return "\n".join(out) + "\n"


def _md_default(value: Any) -> str:
    if isinstance(value, tuple):
        return "`[" + ", ".join(f"{plain_number(v)}" for v in value) + "]`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`" if isinstance(value, float) else f"`{value}`"


def _md_allowed(default: Any, meta: dict[str, Any]) -> str:
    if meta["choices"]:
        return ", ".join(f"`{c}`" for c in meta["choices"])
    if meta["lo"] is None:
        return "text" if isinstance(default, str) else "–"
    low = "(" if meta["lo_open"] else "["
    high = ")" if meta["hi_open"] else "]"
    kind = "integer " if isinstance(default, int) else "list of " if isinstance(default, tuple) else ""
    return f"{kind}{low}{plain_number(meta['lo'])}, {plain_number(meta['hi'])}{high}"


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())
