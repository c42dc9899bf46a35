"""``hmctl``: drive the local hivemindd over its unix socket (HTTP/JSON, see protocol.py).

A thin client: stdlib HTTP, no torch, hivemind or aiohttp imports, so every
command answers in tens of milliseconds.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import click

from hivemindd.dataset_pack import dataset
from hivemindd.protocol import (
    EX_FAILURE,
    EX_NOPERM,
    EX_UNAVAILABLE,
    ROUTES,
    JoinRequest,
    RequestError,
    format_duration,
    parse_duration,
)

SYSTEM_SOCKET = Path("/run/hivemindd/hivemindd.sock")  # the system unit's (systemd/hivemindd.service)


def default_socket() -> Path:
    """$HIVEMINDD_STATE_DIR's socket; else this user's daemon's; else the system service's if it exists."""
    state_dir = os.environ.get("HIVEMINDD_STATE_DIR")
    if state_dir:
        return Path(state_dir).expanduser() / "hivemindd.sock"
    xdg = os.environ.get("XDG_STATE_HOME")
    own = (Path(xdg) if xdg else Path.home() / ".local" / "state") / "hivemindd" / "hivemindd.sock"
    return SYSTEM_SOCKET if not own.exists() and SYSTEM_SOCKET.exists() else own


class ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(error.get("message") or f"HTTP {status}")
        self.status = status
        self.body = body


class Client:
    """One daemon, addressed by its socket path; raises ApiError for 4xx/5xx answers."""

    def __init__(self, socket_path: Path, json_output: bool = False, timeout: float = 120.0) -> None:
        self.socket_path = socket_path
        self.json_output = json_output
        self.timeout = timeout

    def reachable(self) -> bool:
        """Whether something accepts connections on the socket (without asking it anything)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket_path))
                return True
            except OSError:
                return False

    def exchange(self, method: str, path: str, payload: bytes | None = None) -> tuple[int, bytes]:
        """One HTTP/1.0 request over the socket: (status, body). The server closes after replying,
        so no keep-alive, chunking or header parsing is needed (and http.client's import cost is saved)."""
        head = [f"{method} {path} HTTP/1.0", "Host: localhost", "Accept: application/json"]
        if payload is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
        request = ("\r\n".join(head) + "\r\n\r\n").encode() + (payload or b"")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(str(self.socket_path))
            sock.sendall(request)
            chunks = []
            while chunk := sock.recv(1 << 16):
                chunks.append(chunk)
        header, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        status_line = header.split(b"\r\n", 1)[0].split()
        if len(status_line) < 2 or not status_line[1].isdigit():
            raise ValueError(f"not an HTTP reply: {header[:80]!r}")
        return int(status_line[1]), body

    def call(self, name: str, body: dict[str, Any] | None = None, query: str = "") -> Any:
        route = ROUTES[name]
        payload = json.dumps(body).encode() if body is not None else None
        try:
            status, raw = self.exchange(route.method, route.path + (f"?{query}" if query else ""), payload)
        except (FileNotFoundError, ConnectionRefusedError):
            fail(f"hivemindd is not running (nothing listens on {self.socket_path}). Start it with `hivemindd`, "
                 "or check `systemctl status hivemindd`; pass --socket if it uses another path.", EX_UNAVAILABLE)
        except PermissionError:
            fail(f"permission denied on {self.socket_path}: run as the daemon's user or a member of its group.",
                 EX_NOPERM)
        except TimeoutError:
            fail(f"hivemindd did not answer within {self.timeout:.0f} s on {self.socket_path}.", EX_UNAVAILABLE)
        except (OSError, ValueError) as exc:
            fail(f"cannot talk to hivemindd on {self.socket_path}: {exc}", EX_UNAVAILABLE)
        try:
            decoded = json.loads(raw) if raw else None
        except ValueError:
            fail(f"hivemindd sent a reply that is not JSON (HTTP {status})", EX_UNAVAILABLE)
        if status >= 400:
            raise ApiError(status, decoded if isinstance(decoded, dict) else {})
        return decoded

    def act(self, name: str, body: dict[str, Any] | None = None) -> Any:
        """Call and turn an API error into a one-line message and exit 1 (77 when not allowed)."""
        try:
            return self.call(name, body)
        except ApiError as exc:
            fail(str(exc), EX_NOPERM if exc.status in (401, 403) else EX_FAILURE)

    def show(self, value: Any, human: str) -> None:
        click.echo(json.dumps(value, indent=2) if self.json_output else human)


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"hmctl: {message}", err=True)
    sys.exit(code)


pass_client = click.make_pass_decorator(Client)
json_option = click.option("--json", "json_output", is_flag=True, help="Print JSON for scripts.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "socket_path", envvar="HIVEMINDD_SOCKET", type=click.Path(dir_okay=False, path_type=Path),
              help="hivemindd's control socket. [$HIVEMINDD_SOCKET, else <state-dir>/hivemindd.sock, "
                   "else /run/hivemindd/hivemindd.sock]")
@click.pass_context
def main(ctx: click.Context, socket_path: Path | None) -> None:
    """Control the hivemindd on this machine.

    \b
      hmctl join --run-id demo --spec examples/demo.toml   create a run and join it
      hmctl join --run-id demo                             join a run another host created
      hmctl status                                         what this host is doing
      hmctl pause | resume | leave                         stop training for a while / for good
      hmctl logs -f                                        follow the trainer's log

    Exit codes: 0 ok, 1 the daemon refused the request, 69 the daemon is unreachable,
    77 this user may not do that (join the operator group).
    """
    ctx.obj = Client(socket_path or default_socket())


def _with_json(ctx: click.Context, json_output: bool) -> None:
    ctx.find_object(Client).json_output = json_output  # type: ignore[union-attr]


@main.command()
@json_option
@click.pass_context
def status(ctx: click.Context, json_output: bool) -> None:
    """This host: peer id, run, trainer state and progress, peers, discovery."""
    _with_json(ctx, json_output)
    client: Client = ctx.obj
    st = client.act("status")
    client.show(st, render_status(st))


def render_status(st: dict[str, Any]) -> str:
    t = st["trainer"]
    d = st["discovery"]
    lines = [f"peer      {st['peer_id']}  ({st['hostname']}, hivemindd {st['version']})"]
    if st["run_id"] is None:
        lines.append("run       not joined (hmctl join --run-id ID [--spec FILE.toml])")
    else:
        host = st.get("host") or {}
        lines.append(f"run       {st['run_id']}{'  [paused]' if st['paused'] else ''}  "
                     f"(device {host.get('device')}, batch {host.get('batch_size')}, workers {host.get('workers')})")
        if st["paused"]:
            lines.append(f"pause     {describe_pause(st.get('pause'))}")
        since = f"for {_duration(t['since_s'])}"
        extra = f"  retry in {_duration(t['retry_in_s'])}" if t.get("retry_in_s") is not None else ""
        pid = f"  pid {t['pid']}" if t.get("pid") else ""
        lines.append(f"trainer   {t['state']} {since}{pid}  restarts {t['restarts']}{extra}")
        if t.get("step") is not None:
            loss = f"  loss {t['loss']:.4f}" if isinstance(t.get("loss"), (int, float)) else ""
            sps = f"  {t['samples_per_s']:.1f} samples/s" if isinstance(t.get("samples_per_s"), (int, float)) else ""
            lines.append(f"progress  step {t['step']}  epoch {t.get('epoch')}{loss}{sps}  "
                         f"checkpoint step {t.get('checkpoint_step')}")
            if t.get("shards_failed"):
                lines.append(f"data      {t['shards_failed']} shard(s) could not be read and were skipped (hmctl logs)")
        if t.get("last_error"):
            lines.append(f"error     {t['last_error']}")
        for line in t.get("error_lines") or []:
            lines.append(f"  | {line}")
    state = d["state"] + (f": {d['error']}" if d.get("error") else "")
    lines.append(f"peers     {st['peers']} fresh  (discovery {d['url']}: {state})")
    if st.get("http"):
        lines.append(f"http      {st['http']['url']}  (bearer token in {st['http']['token_file']})")
    return "\n".join(lines)


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


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@main.command()
@json_option
@click.pass_context
def peers(ctx: click.Context, json_output: bool) -> None:
    """Fresh peers of this host's run (or all hosts when not joined)."""
    _with_json(ctx, json_output)
    client: Client = ctx.obj
    found = client.act("peers")
    rows = [f"{'PEER ID':<54} {'AGE':>6}  {'STATE':<10} {'HOST':<20} ADDRESS"]
    for p in found:
        rows.append(f"{p['peer_id']:<54} {p['age_s']:>5.0f}s  {p.get('state') or '-':<10} "
                    f"{p.get('hostname') or '-':<20} {p['maddrs'][0] if p['maddrs'] else '-'}")
    client.show(found, "\n".join(rows) if found else "no fresh peers yet (they appear within one heartbeat)")


@main.command()
@click.option("--run-id", required=True, help="The run to join (letters, digits, '.', '_', '-').")
@click.option("--spec", "spec_file", type=click.File("r"), help="TOML run spec: creates the run if it does not exist.")
@click.option("--device", type=click.Choice(["auto", "cuda", "mps", "cpu"]), help="Where this host trains. [auto]")
@click.option("--batch-size", type=click.IntRange(1), help="Samples per local step on this host. [32]")
@click.option("--workers", type=click.IntRange(0), help="Data-loader worker processes. [0]")
@json_option
@click.pass_context
def join(ctx: click.Context, run_id: str, spec_file: Any, device: str | None, batch_size: int | None,
         workers: int | None, json_output: bool) -> None:
    """Join a run (with --spec: create it first). Host settings are this machine's own."""
    _with_json(ctx, json_output)
    client: Client = ctx.obj
    request = JoinRequest(
        run_id=run_id,
        spec_toml=spec_file.read() if spec_file else None,
        spec_source=spec_file.name if spec_file else "spec.toml",
        device=device, batch_size=batch_size, workers=workers,
    )
    result = client.act("join", request.to_body())
    verb = "created and joined" if result["created"] else "joined"
    client.show(result, f"{verb} run {run_id}; `hmctl status` shows the trainer")


def _simple(name: str, doc: str, done: str) -> None:
    @main.command(name=name, help=doc)
    @json_option
    @click.pass_context
    def command(ctx: click.Context, json_output: bool) -> None:
        _with_json(ctx, json_output)
        client: Client = ctx.obj
        result = client.act(name, {})
        client.show(result, done.format(**result))


_simple("leave", "Leave the run: the trainer checkpoints and stops; this host stays online.", "left run {left}")
@main.command()
@click.option("--for", "duration", metavar="DURATION",
              help="Resume by itself after this long: 90s, 30m, 2h, 1h30m, 1d. [until hmctl resume]")
@click.option("--after-checkpoint", is_flag=True, help="Let the trainer reach its next checkpoint first.")
@json_option
@click.pass_context
def pause(ctx: click.Context, duration: str | None, after_checkpoint: bool, json_output: bool) -> None:
    """Stop training but stay in the run; kept across daemon restarts and reboots."""
    _with_json(ctx, json_output)
    client: Client = ctx.obj
    body: dict[str, Any] = {"after_checkpoint": after_checkpoint}
    if duration is not None:
        try:
            parse_duration(duration, "--for")  # refuse a typo here, before anything changes
        except RequestError as exc:
            raise click.BadParameter(exc.message.removeprefix("--for").lstrip(": "), param_hint="'--for'") from None
        body["for"] = duration
    result = client.act("pause", body)
    client.show(result, f"run {result['run_id']}: {describe_pause(result.get('pause'))}")


_simple("resume", "Resume training from the latest checkpoint.", "resumed run {run_id}")


@main.command()
@click.option("-n", "lines", type=click.IntRange(1, 10_000), default=50, show_default=True, help="Lines to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@click.option("--json", "json_output", is_flag=True, help="Print JSON ({lines, next}; with -f one object a poll).")
@click.pass_obj
def logs(client: Client, lines: int, follow: bool, json_output: bool) -> None:
    """The trainer's log (its output plus the daemon's notes on starts and exits)."""
    def emit(result: dict[str, Any]) -> None:
        if json_output:
            click.echo(json.dumps(result))
        else:
            for line in result["lines"]:
                click.echo(line)

    result = _logs(client, f"n={lines}")
    emit(result)
    if not follow:
        return
    after = result["next"]
    try:
        while True:
            time.sleep(0.5)  # polling interval of follow mode
            result = _logs(client, f"n=1000&after={after}")
            if result["lines"]:
                emit(result)
            after = result["next"]
    except KeyboardInterrupt:
        pass


def _logs(client: Client, query: str) -> Any:
    try:
        return client.call("logs", query=query)
    except ApiError as exc:
        fail(str(exc), EX_FAILURE)


main.add_command(dataset)

if __name__ == "__main__":
    main()
