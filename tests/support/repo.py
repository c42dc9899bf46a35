"""The checkout the tests run from, and what it ships that tests check answers against: the API schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def api_schema(name: str) -> dict[str, Any]:
    """A component schema of hivemindd/wire/openapi.yaml, resolvable by jsonschema."""
    import yaml

    doc = yaml.safe_load((REPO / "hivemindd" / "wire" / "openapi.yaml").read_text())
    return {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}


def check_schema(value: Any, name: str) -> None:
    """Fail unless ``value`` is what the API's schema ``name`` says it is."""
    import jsonschema

    jsonschema.validate(value, api_schema(name))
