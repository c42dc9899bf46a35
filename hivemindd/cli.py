"""``hmctl``: drive the local hivemindd over its unix socket (HTTP/JSON, see protocol.py).

A thin client: stdlib HTTP, no torch, hivemind or aiohttp imports, so every
command answers in tens of milliseconds.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
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


SOCKET_NAME = "hivemindd.sock"  # the daemon's socket in its state dir (config.py's default)
# sun_path holds 108 bytes on Linux and 104 on macOS and the BSDs, the terminating NUL included.
SOCKET_PATH_LIMIT = 107 if sys.platform.startswith("linux") else 103


def default_socket() -> Path:
    """$HIVEMINDD_STATE_DIR's socket; else this user's daemon's; else the system service's if it exists."""
    state_dir = os.environ.get("HIVEMINDD_STATE_DIR")
    if state_dir:
        return Path(state_dir).expanduser() / SOCKET_NAME
    xdg = os.environ.get("XDG_STATE_HOME")
    own = (Path(xdg) if xdg else Path.home() / ".local" / "state") / "hivemindd" / SOCKET_NAME
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

    def check_path(self) -> None:
        """Exit with a message that says what to do when the socket path cannot be a unix socket's address."""
        size = len(os.fsencode(self.socket_path))
        if size > SOCKET_PATH_LIMIT:
            fail(f"socket path {self.socket_path} is {size} bytes, longer than a unix socket address may be "
                 f"({SOCKET_PATH_LIMIT} bytes on this system): start hivemindd with a shorter --state-dir or "
                 "--socket, or make a symbolic link to the socket in a short folder and pass that as --socket.",
                 EX_UNAVAILABLE)

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
        self.check_path()
        try:
            status, raw = self.exchange(route.method, route.path + (f"?{query}" if query else ""), payload)
        except (FileNotFoundError, ConnectionRefusedError):
            fail(f"hivemindd is not running (nothing listens on {self.socket_path}). Start it with `hivemindd`, "
                 "or check `systemctl status hivemindd`; pass --state-dir or --socket if it uses another path.",
                 EX_UNAVAILABLE)
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


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"hmctl: {printable(message)}", err=True)
    sys.exit(code)


pass_client = click.make_pass_decorator(Client)
json_option = click.option("--json", "json_output", is_flag=True, help="Print JSON for scripts.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--state-dir", "state_dir", envvar="HIVEMINDD_STATE_DIR", metavar="DIR",
              type=click.Path(file_okay=False, path_type=Path),
              help="The daemon's state directory (as given to `hivemindd --state-dir`); hmctl talks to "
                   "DIR/hivemindd.sock. [$HIVEMINDD_STATE_DIR, else ~/.local/state/hivemindd, "
                   "else the system service's]")
@click.option("--socket", "socket_path", envvar="HIVEMINDD_SOCKET", type=click.Path(dir_okay=False, path_type=Path),
              help="hivemindd's control socket, when the daemon was given its own --socket. "
                   "[$HIVEMINDD_SOCKET, else <state-dir>/hivemindd.sock, else /run/hivemindd/hivemindd.sock]")
@click.pass_context
def main(ctx: click.Context, state_dir: Path | None, socket_path: Path | None) -> None:
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
    ctx.obj = Client(choose_socket(ctx, state_dir, socket_path))


def choose_socket(ctx: click.Context, state_dir: Path | None, socket_path: Path | None) -> Path:
    """Flags before environment variables; at the same level --socket (the exact path) before --state-dir."""
    from_state_dir = state_dir.expanduser() / SOCKET_NAME if state_dir is not None else None
    typed = {name: ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
             for name in ("socket_path", "state_dir")}
    if socket_path is not None and typed["socket_path"]:
        return socket_path
    if from_state_dir is not None and typed["state_dir"]:
        return from_state_dir
    return socket_path or from_state_dir or default_socket()


def _with_json(ctx: click.Context, json_output: bool) -> None:
    ctx.find_object(Client).json_output = json_output  # type: ignore[union-attr]


@main.command()
@click.option("--swarm", "swarm_view", is_flag=True, help="Every live peer of the run (from the DHT) and swarm totals.")
@json_option
@click.pass_context
def status(ctx: click.Context, swarm_view: bool, json_output: bool) -> None:
    """This host: peer id, run, trainer state and progress, peers, discovery."""
    _with_json(ctx, json_output)
    client: Client = ctx.obj
    if swarm_view:
        view = client.act("swarm")
        client.show(view, render_swarm(view))
        return
    st = client.act("status")
    client.show(st, render_status(st))


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
                    f"{(p.get('device') or '-'):<8} {_duration(p['age_s'])} ago")
    t = view["totals"]
    done = t.get("dataset_epochs")
    goal = f" of {t['last_milestone']:g} (last milestone)" if t.get("last_milestone") is not None else ""
    eta = f", ETA {_duration(t['eta_s'])}" if t.get("eta_s") else ""
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


def render_status(st: dict[str, Any]) -> str:
    st = printable(st)
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
            dataset = f" (dataset epoch {t['dataset_epoch']:.2f})" if isinstance(t.get("dataset_epoch"), (int, float)) \
                else ""
            lines.append(f"progress  step {t['step']}  global step {_fmt(t.get('epoch'), 'd')}{dataset}{loss}{sps}  "
                         f"checkpoint step {t.get('checkpoint_step')}")
            if isinstance(t.get("swarm_peers"), int):
                lines.append(f"swarm     averaging with {t['swarm_peers'] - 1} other peer(s)")
            if t.get("shards_failed"):
                lines.append(f"data      {t['shards_failed']} shard(s) could not be read and were skipped (hmctl logs)")
        if t.get("last_error"):
            lines.append(f"error     {t['last_error']}")
        elif t.get("previous_error"):
            lines.append(f"restarted after: {t['previous_error']}")
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
    rows = [f"{'PEER ID':<54} {'AGE':>6}  {'DOING':<14} {'STATE':<10} {'HOST':<20} ADDRESS"]
    for p in printable(found):
        rows.append(f"{p['peer_id']:<54} {p['age_s']:>5.0f}s  {p.get('activity') or '-':<14} {p.get('state') or '-':<10} "
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
@click.option("--since", metavar="WHEN", help="Only lines from this long ago (10m, 1h30m) or since a time "
              "(2025-01-31T14:05, 14:05).")
@click.option("--trainer", "only_trainer", is_flag=True, help="Only the trainer's log.")
@click.option("--daemon", "only_daemon", is_flag=True, help="Only the daemon's own log lines.")
@click.option("--json", "json_output", is_flag=True, help="Print JSON ({lines, entries, next}; with -f one object a poll).")
@click.pass_obj
def logs(client: Client, lines: int, follow: bool, since: str | None, only_trainer: bool, only_daemon: bool,
         json_output: bool) -> None:
    """The trainer's log (its output plus the daemon's notes on starts and exits) and the daemon's own lines."""
    if only_trainer and only_daemon:
        raise click.UsageError("--trainer and --daemon exclude each other (give neither for both)")
    source = "trainer" if only_trainer else "daemon" if only_daemon else "all"
    base = f"source={source}"
    if since is not None:
        try:
            base += f"&since={since_time(since):.3f}"
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--since'") from None

    def emit(result: dict[str, Any]) -> None:
        if json_output:
            click.echo(json.dumps(result))
            return
        for entry in result.get("entries") or [{"source": "trainer", "line": line} for line in result["lines"]]:
            prefix = "[daemon] " if source == "all" and entry["source"] == "daemon" else ""
            click.echo(prefix + printable(entry["line"]))

    result = _logs(client, f"{base}&n={lines}")
    emit(result)
    if not follow:
        return
    after, after_daemon = result["next"], result.get("next_daemon", 0)
    try:
        while True:
            time.sleep(0.5)  # polling interval of follow mode
            result = _logs(client, f"{base}&n=1000&after={after}&after_daemon={after_daemon}")
            if result["lines"]:
                emit(result)
            after, after_daemon = result["next"], result.get("next_daemon", after_daemon)
    except KeyboardInterrupt:
        pass


def since_time(text: str, now: float | None = None) -> float:
    """Unix time of ``--since``: a duration back from now (10m, 1h30m, 2d) or a local date/time."""
    now = time.time() if now is None else now
    try:
        return now - parse_duration(text, "--since")
    except RequestError:
        pass
    try:
        if len(text) <= 5 and ":" in text:  # HH:MM today
            clock = datetime.strptime(text, "%H:%M")
            moment = datetime.fromtimestamp(now).replace(hour=clock.hour, minute=clock.minute, second=0, microsecond=0)
        else:
            moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (10m, 1h30m, 2d) nor a time (2025-01-31T14:05, 14:05)") from None
    return moment.timestamp()


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--checkpoint", default="best", show_default=True, metavar="best|latest|final|PATH",
              help="Which checkpoint of the run (best falls back to latest before the first validation).")
@click.option("--top", type=click.IntRange(1, 100), default=5, show_default=True, help="Classes to show per image.")
@json_option
@click.pass_context
def predict(ctx: click.Context, images: tuple[Path, ...], checkpoint: str, top: int, json_output: bool) -> None:
    """Classify images with this host's checkpoint of the run (in a subprocess: hmctl itself stays light)."""
    _with_json(ctx, json_output)
    client: Client = ctx.obj
    st = client.act("status")
    if st["run_id"] is None and checkpoint in ("best", "latest", "final"):
        fail("this host is not in a run: pass --checkpoint PATH, or join a run first", EX_FAILURE)
    run_dir = Path(st["state_dir"]) / "runs" / (st["run_id"] or "")
    command = [sys.executable, "-m", "hivemindd.predict", "--run-dir", str(run_dir), "--checkpoint", checkpoint,
               "--top", str(top), *map(str, images)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        fail((done.stderr.strip().splitlines() or [f"predict exited with {done.returncode}"])[-1].removeprefix("predict: "),
             EX_FAILURE)
    result = json.loads(done.stdout)
    client.show(result, render_prediction(result))


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


@main.command()
@click.pass_obj
def dashboard(client: Client) -> None:
    """Print the dashboard's address (needs the daemon's --http listener), with its token when readable."""
    st = client.act("status")
    if not st.get("http"):
        fail("the daemon serves no loopback HTTP listener: start it with --http 127.0.0.1:PORT (or set http in its "
             "config), then open the address this prints", EX_FAILURE)
    url, token_file = st["http"]["url"], Path(st["http"]["token_file"])
    try:
        click.echo(printable(f"{url}/?token={token_file.read_text().strip()}"))
    except OSError:
        click.echo(f"{url}/?token=<the token in {token_file}, readable by the daemon's user>")


def _logs(client: Client, query: str) -> Any:
    try:
        return client.call("logs", query=query)
    except ApiError as exc:
        fail(str(exc), EX_FAILURE)


main.add_command(dataset)

if __name__ == "__main__":
    main()
