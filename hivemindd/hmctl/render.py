"""What hmctl prints: status, swarm, pause and prediction tables, with peers' strings made inert."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from hivemindd.wire.protocol import format_duration
from hivemindd.wire.status import HostStatus

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(value: Any) -> Any:
    """``value`` (a string, or one inside dicts and lists) with control, bidi and other unprintable characters
    shown as escapes (``\\x1b``, ``\\n``), so that hostnames, states and log lines from peers, records and specs
    cannot move the cursor, recolour the terminal or forge a line of their own."""
    if isinstance(value, str):
        return value if value.isprintable() else "".join(ch if ch.isprintable() else _escape(ch) for ch in value)
    if isinstance(value, dict):
        return {printable(k): printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [printable(v) for v in value]
    return value


def _escape(ch: str) -> str:
    code = ord(ch)
    return _ESCAPES.get(ch) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000
                                else f"\\U{code:08x}")


def _fmt(value: Any, spec: str, none: str = "-") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else none


def render_swarm(view: dict[str, Any]) -> str:
    """The swarm table and its totals, for ``hmctl status --swarm``."""
    view = printable(view)
    if view.get("run_id") is None:
        return "not in a run (hmctl join --run-id ID): no swarm to show"
    rows = [f"{'HOST':<18} {'PEER':<14} {'DOING':<14} {'STEP':>7} {'GLOBAL STEP':>11} {'SAMPLES/S':>9} {'LOSS':>7} "
            f"{'VAL TOP-1':>9} {'DEVICE':<8} SEEN"]
    for p in view["peers"]:
        top1 = p.get("best_val_top1") if p.get("best_val_top1") is not None else p.get("val_top1")
        rows.append(f"{p['hostname'][:18]:<18} {p['peer_id'][:12] + '…':<14} {p['activity']:<14} "
                    f"{_fmt(p.get('step'), 'd'):>7} {_fmt(p.get('epoch'), 'd'):>11} {_fmt(p.get('samples_per_s'), '.1f'):>9} "
                    f"{_fmt(p.get('loss'), '.4f'):>7} {_fmt(None if top1 is None else 100 * top1, '.1f') + '%':>9} "
                    f"{(p.get('device') or '-'):<8} {duration(p['age_s'])} ago")
    t = view["totals"]
    done = t.get("dataset_epochs")
    goal = f" of {t['last_milestone']:g} (last milestone)" if t.get("last_milestone") is not None else ""
    eta = f", ETA {duration(t['eta_s'])}" if t.get("eta_s") else ""
    best = t.get("best_val_top1")
    rows += [
        "",
        f"run {view['run_id']}: {t['training']} of {t['peers']} peer(s) training, {t['samples_per_s']:.1f} samples/s",
        f"global step {_fmt(t.get('global_epoch'), 'd')}  dataset epoch {_fmt(done, '.2f')}{goal}{eta}",
        f"best val top-1 {_fmt(None if best is None else 100 * best, '.1f')}%",
    ]
    if view.get("error"):
        rows.append(f"(the DHT did not answer the last read: {view['error']}; showing the previous one)")
    return "\n".join(rows)


def render_status(raw: dict[str, Any]) -> str:
    """``hmctl status``: the control API's status answer for a person."""
    st = HostStatus.from_dict(printable(raw))
    t, d = st.trainer, st.discovery
    lines = [f"peer      {st.peer_id}  ({st.hostname}, hivemindd {st.version})"]
    if st.run_id is None:
        lines.append("run       not joined (hmctl join --run-id ID [--spec FILE.toml])")
    else:
        host = st.host or {}
        lines.append(f"run       {st.run_id}{'  [paused]' if st.paused else ''}  "
                     f"(device {host.get('device')}, batch {host.get('batch_size')}, workers {host.get('workers')})")
        if st.paused:
            lines.append(f"pause     {describe_pause(st.pause)}")
        since = f"for {duration(t.since_s)}"
        extra = f"  retry in {duration(t.retry_in_s)}" if t.retry_in_s is not None else ""
        pid = f"  pid {t.pid}" if t.pid else ""
        lines.append(f"trainer   {t.state} {since}{pid}  restarts {t.restarts}{extra}")
        if t.step is not None:
            loss = f"  loss {t.loss:.4f}" if _is_number(t.loss) else ""
            sps = f"  {t.samples_per_s:.1f} samples/s" if _is_number(t.samples_per_s) else ""
            dataset = f" (dataset epoch {t.dataset_epoch:.2f})" if _is_number(t.dataset_epoch) else ""
            lines.append(f"progress  step {t.step}  global step {_fmt(t.epoch, 'd')}{dataset}{loss}{sps}  "
                         f"checkpoint step {t.checkpoint_step}")
            if isinstance(t.swarm_peers, int):
                lines.append(f"swarm     averaging with {t.swarm_peers - 1} other peer(s)")
            if t.shards_failed:
                lines.append(f"data      {t.shards_failed} shard(s) could not be read and were skipped (hmctl logs)")
        if t.last_error:
            lines.append(f"error     {t.last_error}")
        elif t.previous_error:
            lines.append(f"restarted after: {t.previous_error}")
        for line in t.error_lines or []:
            lines.append(f"  | {line}")
    state = d.state + (f": {d.error}" if d.error else "")
    lines.append(f"peers     {st.peers} fresh  (discovery {d.url}: {state})")
    if st.http:
        lines.append(f"http      {st.http['url']}  (bearer token in {st.http['token_file']})")
    return "\n".join(lines)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def describe_pause(pause: dict[str, Any] | None, now: datetime | None = None) -> str:
    """"paused until 14:05 (in 29m)", "paused indefinitely", "pausing after the next checkpoint" …"""
    pause = pause or {}
    until = ""
    if pause.get("until"):
        moment = datetime.fromisoformat(pause["until"]).astimezone()  # shown in this machine's time zone
        now = now or datetime.now().astimezone()
        clock = moment.strftime("%H:%M") if moment.date() == now.date() else moment.strftime("%Y-%m-%d %H:%M")
        left = pause.get("remaining_s")
        left = (moment - now).total_seconds() if left is None else left
        until = f"until {clock} (in {format_duration(left)})"
    if pause.get("after_checkpoint"):
        return "pausing after the next checkpoint" + (f", then paused {until}" if until else "")
    return f"paused {until}" if until else "paused indefinitely (hmctl resume)"


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def render_prediction(result: dict[str, Any]) -> str:
    result = printable(result)
    lines = [f"checkpoint {result['checkpoint']} (step {result.get('step')}, {result.get('arch')})"]
    for item in result["results"]:
        lines.append(f"{item['image']}:")
        if "error" in item:
            lines.append(f"  {item['error']}")
            continue
        for c in item["top"]:
            name = c.get("label") or c.get("name") or f"class {c['index']}"
            synset = f" ({c['synset']})" if c.get("synset") else ""
            lines.append(f"  {100 * c['probability']:6.2f}%  {name}{synset}  [#{c['index']}]")
    return "\n".join(lines)
