"""``hmctl``'s commands: drive the local hivemindd over its unix socket (HTTP/JSON, see wire/protocol.py).

A thin client: stdlib HTTP, no torch, hivemind or aiohttp imports, so every
command answers in tens of milliseconds. The client is ``client.py``, what it
prints ``render.py``; ``hivemindd/cli.py`` adds the tool commands and is the entry point.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from hivemindd.hmctl.client import SOCKET_NAME, ApiError, Client, default_socket, fail
from hivemindd.hmctl.render import describe_pause, printable, render_prediction, render_status, render_swarm
from hivemindd.wire.launch import HostSettings
from hivemindd.wire.protocol import EX_FAILURE, JoinRequest, RequestError, parse_duration

_HOST = HostSettings()  # the defaults a join without flags gets (the daemon's [host] table may set others)
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
@click.option("--device", type=click.Choice(HostSettings.DEVICES), help=f"Where this host trains. [{_HOST.device}]")
@click.option("--batch-size", type=click.IntRange(1), help=f"Samples per local step on this host. [{_HOST.batch_size}]")
@click.option("--workers", type=click.IntRange(0), help=f"Data-loader worker processes. [{_HOST.workers}]")
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
    command = [sys.executable, "-m", "hivemindd.tools.predict", "--run-dir", str(run_dir), "--checkpoint", checkpoint,
               "--top", str(top), *map(str, images)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        fail((done.stderr.strip().splitlines() or [f"predict exited with {done.returncode}"])[-1].removeprefix("predict: "),
             EX_FAILURE)
    result = json.loads(done.stdout)
    client.show(result, render_prediction(result))


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

