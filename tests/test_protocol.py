"""The API schema: one source for the routes, the request checks and the OpenAPI document."""

from pathlib import Path

import pytest
import yaml

from hivemindd.wire.protocol import ROUTES, JoinRequest, RequestError, parse_empty, parse_log_query

OPENAPI = yaml.safe_load((Path(__file__).resolve().parents[1] / "hivemindd" / "wire" / "openapi.yaml").read_text())


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_every_route_is_documented(name: str) -> None:
    route = ROUTES[name]
    assert route.method.lower() in OPENAPI["paths"][route.path]


def test_join_request_round_trip() -> None:
    request = JoinRequest(run_id="demo", spec_toml="[model]\n", device="cpu", batch_size=8)
    assert JoinRequest.parse(request.to_body()) == JoinRequest(run_id="demo", spec_toml="[model]\n", device="cpu",
                                                               batch_size=8)


@pytest.mark.parametrize("body, field", [
    ({}, "run_id"), ({"run_id": "a/b"}, "run_id"), ({"run_id": "ok", "batch_size": True}, "batch_size"),
    ({"run_id": "ok", "workers": 1.5}, "workers"), ({"run_id": "ok", "spec_toml": 3}, "spec_toml"),
    ({"run_id": "ok", "extra": 1}, "extra"),
])
def test_join_request_errors_name_the_field(body: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(RequestError) as err:
        JoinRequest.parse(body)
    assert err.value.field == field and err.value.status == 400


def test_non_object_bodies_are_refused() -> None:
    with pytest.raises(RequestError, match="JSON object"):
        JoinRequest.parse([1])
    with pytest.raises(RequestError, match="unknown field"):
        parse_empty({"now": True})
    parse_empty(None)
    parse_empty({})


@pytest.mark.parametrize("query, error", [({"n": "x"}, "integer"), ({"n": "0"}, "1..10000"),
                                          ({"after": "-1"}, ">= 0"), ({"tail": "1"}, "unknown query")])
def test_log_query_validation(query: dict, error: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(RequestError, match=error):
        parse_log_query(query)
    assert parse_log_query({"n": "5", "after": "10"}) == (5, 10)


def test_the_status_types_and_the_openapi_document_name_the_same_fields() -> None:
    """wire/status.py is the status contract; openapi.yaml describes it for other clients: the two never drift."""
    import dataclasses

    from hivemindd.wire.states import TrainerState
    from hivemindd.wire.status import DhtStatus, DiscoveryStatus, HostStatus, TrainerStatus

    schemas = OPENAPI["components"]["schemas"]
    status = schemas["Status"]["properties"]
    for cls, documented in ((HostStatus, status), (TrainerStatus, schemas["Trainer"]["properties"]),
                            (DiscoveryStatus, status["discovery"]["properties"]), (DhtStatus, status["dht"]["properties"])):
        assert {f.name for f in dataclasses.fields(cls)} == set(documented), cls.__name__
    assert schemas["Trainer"]["properties"]["state"]["enum"] == [s.value for s in TrainerState]


def test_status_readers_tolerate_newer_and_older_daemons() -> None:
    from hivemindd.wire.status import HostStatus

    newer = {"run_id": "r", "trainer": {"state": "running", "epoch": 3, "from_the_future": 1}, "extra": [1]}
    status = HostStatus.from_dict(newer)
    assert status.run_id == "r" and status.trainer.epoch == 3 and status.trainer.step is None
    assert status.discovery.state == "starting" and status.dht.alive  # an older daemon sent no such parts
    assert HostStatus.from_dict(status.to_dict()) == status
    assert HostStatus.from_dict("not a status") == HostStatus()
