"""Pause semantics without processes: durations, persistence, and the supervisor's timed and after-checkpoint pauses."""

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hivemindd.hmctl.render import describe_pause
from hivemindd.host.state import DesiredState, load_state, save_state, utc_iso
from hivemindd.host.statedir import StateError
from hivemindd.host.supervisor import PauseChange, Supervisor
from hivemindd.wire.launch import HostSettings
from hivemindd.wire.protocol import PauseRequest, RequestError, format_duration, parse_duration
from hivemindd.wire.states import TrainerState
from tests.test_supervisor import FakeSpawner, launch, until, with_supervisor

S = TrainerState


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400),
                                           ("1d", 86400), ("1d2h3m4s", 93784), ("366d", 366 * 86400)])
def test_durations_parse(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text, why", [
    ("", "not a duration"), ("30", "not a duration"), ("m", "not a duration"), ("1.5h", "not a duration"),
    ("30m1h", "not a duration"), ("1h1h", "not a duration"), ("1h 30m", "not a duration"), ("-5m", "not a duration"),
    ("0s", "more than 0s"), ("367d", "at most 366d"), ("99999999999999h", "at most 366d"), ("x" * 500, "not a duration"),
    (30, "must be a duration string"), (None, "must be a duration string"), (True, "must be a duration string"),
])
def test_bad_durations_name_the_field(text: object, why: str) -> None:
    with pytest.raises(RequestError, match=why) as err:
        parse_duration(text, "for")
    assert err.value.field == "for" and err.value.status == 400
    assert len(err.value.message) < 200  # a 500-character typo is not echoed back whole


def test_durations_display_round_trips() -> None:
    for text in ("90s", "30m", "2h", "1h30m", "1d2h"):
        assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)
    assert format_duration(29 * 60 + 59.6) == "30m" and format_duration(0) == "0s" and format_duration(-3) == "0s"


@pytest.mark.parametrize("body, field, why", [
    ({"for": "soon"}, "for", "not a duration"),
    ({"for": 30}, "for", "duration string"),
    ({"after_checkpoint": "yes"}, "after_checkpoint", "true or false"),
    ({"until": "14:00"}, "until", "unknown field"),
])
def test_pause_request_errors_name_the_field(body: dict, field: str, why: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(RequestError, match=why) as err:
        PauseRequest.parse(body)
    assert err.value.field == field


def test_pause_request_defaults() -> None:
    assert PauseRequest.parse(None) == PauseRequest.parse({}) == PauseRequest()
    assert PauseRequest.parse({"for": "1h30m", "after_checkpoint": True}) == PauseRequest(5400.0, True)


def test_timed_pause_survives_a_restart_as_an_absolute_utc_time(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    deadline = datetime(2031, 5, 6, 14, 5, tzinfo=UTC).timestamp()
    state = DesiredState().joined("demo", HostSettings()).with_paused(True, deadline, after_checkpoint=True)
    save_state(path, state)
    raw = json.loads(path.read_text())
    assert raw["pause_until"] == "2031-05-06T14:05:00Z" and raw["pause_after_checkpoint"] is True
    assert load_state(path) == state
    took = state.pause_took_effect()
    assert took.paused and took.pause_until == deadline and not took.pause_after_checkpoint
    assert not state.with_paused(False).pause_until and state.left().pause_until is None


def test_state_written_before_timed_pauses_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": 1, "run_id": "demo", "host": {}, "paused": True}))
    state = load_state(path)
    assert state.paused and state.pause_until is None and not state.pause_after_checkpoint


@pytest.mark.parametrize("extra, why", [
    ({"pause_until": "tomorrow"}, "tomorrow"),
    ({"pause_until": 1700000000}, "pause_until"),
    ({"pause_until": "2031-05-06T14:05:00"}, "no time zone"),
    ({"pause_after_checkpoint": "yes"}, "pause_after_checkpoint"),
])
def test_bad_pause_in_state_file_is_named_and_kept(tmp_path: Path, extra: dict, why: str) -> None:  # type: ignore[type-arg]
    path = tmp_path / "state.json"
    body = json.dumps({"run_id": "demo", "paused": True, **extra}).encode()
    path.write_bytes(body)
    with pytest.raises(StateError, match=why):
        load_state(path)
    assert path.read_bytes() == body


def test_pause_status_says_until_when() -> None:
    state = DesiredState().joined("demo", HostSettings()).with_paused(True, 1000.0)
    assert state.pause_status(400.0) == {"until": utc_iso(1000.0), "remaining_s": 600.0, "after_checkpoint": False}
    assert state.pause_status(2000.0)["remaining_s"] == 0  # type: ignore[index]
    assert state.with_paused(False).pause_status(0) is None


def test_status_wording() -> None:
    now = datetime(2031, 5, 6, 13, 36, tzinfo=UTC).astimezone()
    deadline = (now + timedelta(minutes=29)).astimezone(UTC)
    timed = {"until": deadline.isoformat().replace("+00:00", "Z"), "remaining_s": 29 * 60, "after_checkpoint": False}
    assert describe_pause(timed, now) == f"paused until {(now + timedelta(minutes=29)).strftime('%H:%M')} (in 29m)"
    assert describe_pause({"until": None, "remaining_s": None, "after_checkpoint": False}, now).startswith(
        "paused indefinitely")
    assert describe_pause({"until": None, "remaining_s": None, "after_checkpoint": True}, now) == \
        "pausing after the next checkpoint"
    assert describe_pause({**timed, "after_checkpoint": True}, now).startswith(
        "pausing after the next checkpoint, then paused until")
    far = {**timed, "until": (now + timedelta(days=3)).astimezone(UTC).isoformat(), "remaining_s": 3 * 86400}
    assert describe_pause(far, now).startswith(f"paused until {(now + timedelta(days=3)).strftime('%Y-%m-%d')}")


class WallClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def pausing_supervisor(tmp_path: Path, test: object) -> list[PauseChange]:
    """Run ``test(sup, spawner, wall)`` with a supervisor whose wall clock the test moves."""
    changes: list[PauseChange] = []
    wall = WallClock()

    async def scenario(sup: Supervisor, spawner: FakeSpawner) -> None:
        sup._wall_clock = wall
        sup._on_pause_change = changes.append
        await test(sup, spawner, wall)  # type: ignore[operator]

    with_supervisor(scenario, tmp_path)
    return changes


def test_timed_pause_resumes_by_itself(tmp_path: Path) -> None:
    async def test(sup: Supervisor, spawner: FakeSpawner, wall: WallClock) -> None:
        sup.want("demo", launch, paused=False)
        await until(lambda: len(spawner.handles) == 1)
        spawner.on_event({"type": "started"})
        sup.want("demo", launch, paused=True, user_action=True, until=wall.now + 60)
        await until(lambda: sup.state is S.PAUSED)
        assert spawner.handles[0].signals == ["TERM"]
        wall.now += 59
        sup._changed.set()  # a wake-up before the deadline changes nothing
        await until(lambda: not sup._changed.is_set())
        assert sup.state is S.PAUSED and len(spawner.handles) == 1
        wall.now += 1
        sup._changed.set()  # stands in for the loop's own re-check (at most PAUSE_RECHECK_S)
        await until(lambda: len(spawner.handles) == 2)
        assert sup.state is S.STARTING

    assert pausing_supervisor(tmp_path, test) == [PauseChange.EXPIRED]


def test_pause_whose_deadline_passed_while_down_ends_at_once(tmp_path: Path) -> None:
    async def test(sup: Supervisor, spawner: FakeSpawner, wall: WallClock) -> None:
        sup.want("demo", launch, paused=True, until=wall.now - 5)  # as the daemon restores it after a reboot
        await until(lambda: len(spawner.handles) == 1)
        assert sup.state is S.STARTING

    assert pausing_supervisor(tmp_path, test) == [PauseChange.EXPIRED]


def test_after_checkpoint_pause_waits_for_the_checkpoint(tmp_path: Path) -> None:
    async def test(sup: Supervisor, spawner: FakeSpawner, wall: WallClock) -> None:
        sup.want("demo", launch, paused=False)
        await until(lambda: len(spawner.handles) == 1)
        spawner.on_event({"type": "started"})
        sup.want("demo", launch, paused=True, user_action=True, after_checkpoint=True)
        spawner.on_event({"type": "progress", "step": 4})
        await until(lambda: not sup._changed.is_set())
        assert sup.state is S.RUNNING and spawner.handles[0].signals == []  # still training
        spawner.on_event({"type": "checkpoint", "step": 5})
        await until(lambda: sup.state is S.PAUSED)
        assert spawner.handles[0].signals == ["TERM"] and sup.snapshot().checkpoint_step == 5

    assert pausing_supervisor(tmp_path, test) == [PauseChange.TOOK_EFFECT]


def test_after_checkpoint_pause_of_a_crashed_trainer_holds_at_once(tmp_path: Path) -> None:
    async def test(sup: Supervisor, spawner: FakeSpawner, wall: WallClock) -> None:
        sup.want("demo", launch, paused=False)
        await until(lambda: len(spawner.handles) == 1)
        spawner.handles[0].finish(1)
        await until(lambda: len(spawner.handles) == 2)
        spawner.handles[1].finish(1)  # in backoff now: no trainer that could reach a checkpoint
        await until(lambda: sup.state is S.BACKOFF)
        sup.want("demo", launch, paused=True, user_action=True, after_checkpoint=True)
        await until(lambda: sup.state is S.PAUSED)
        assert len(spawner.handles) == 2  # nothing was started just to write a checkpoint

    assert pausing_supervisor(tmp_path, test) == [PauseChange.TOOK_EFFECT]


def test_resume_cancels_a_pending_after_checkpoint_pause(tmp_path: Path) -> None:
    async def test(sup: Supervisor, spawner: FakeSpawner, wall: WallClock) -> None:
        sup.want("demo", launch, paused=False)
        await until(lambda: len(spawner.handles) == 1)
        spawner.on_event({"type": "started"})
        sup.want("demo", launch, paused=True, after_checkpoint=True)
        sup.want("demo", launch, paused=False, user_action=True)
        spawner.on_event({"type": "checkpoint", "step": 5})
        await until(lambda: not sup._changed.is_set())
        assert sup.state is S.RUNNING and spawner.handles[0].signals == []

    assert pausing_supervisor(tmp_path, test) == []
