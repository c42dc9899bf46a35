"""``hivemindd demo``: a whole swarm on this machine in one command.

Starts N daemons (own state dirs and sockets, one shared file:// discovery
dir), creates the demo run on the first and joins the others by run id, shows
every peer's progress live until Ctrl-C, then stops them all: each trainer
checkpoints, each daemon removes its record, and no process is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from importlib import resources
from pathlib import Path
from typing import Any

import click

from hivemindd.hmctl.client import ApiError, Client
from hivemindd.wire.protocol import JoinRequest

RUN_ID = "demo"


def _demo_spec() -> tuple[str, str]:
    ref = resources.files("hivemindd") / "examples" / "demo.toml"
    return ref.read_text(), "demo.toml"


class LocalPeer:
    """One daemon process of the demo swarm."""

    def __init__(self, root: Path, index: int, discovery: Path, threads: int) -> None:
        self.name = f"peer{index}"
        self.state_dir = root / self.name
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.client = Client(self.state_dir / "hivemindd.sock", timeout=60)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), HIVEMINDD_DEMO="1")
        self.log_path = self.state_dir / "daemon.log"
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hivemindd.daemon", "--state-dir", str(self.state_dir),
                 "--discovery", discovery.as_uri(), "--heartbeat", "2", "--log-format", "json"],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env,
                start_new_session=True,  # Ctrl-C reaches only us; we stop the daemons in order
            )

    def status(self) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.client.call("status")
            return result
        except (ApiError, SystemExit):
            return None

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise click.ClickException(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            if self.client.reachable():
                return
            time.sleep(0.2)  # polling for the socket to appear
        raise click.ClickException(f"{self.name} did not come up in time; see {self.log_path}")

    def stop(self) -> None:
        with suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)

    def reap(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def render(peers: list[LocalPeer]) -> str:
    rows = [f"{'PEER':<6} {'TRAINER':<10} {'STEP':>6} {'GLOBAL STEP':>11} {'LOSS':>8} {'SAMPLES/S':>10} {'CKPT':>6} {'PEERS':>5}"]
    for peer in peers:
        st = peer.status()
        if st is None:
            rows.append(f"{peer.name:<6} {'(down)':<10}")
            continue
        t = st["trainer"]
        loss = f"{t['loss']:.3f}" if isinstance(t.get("loss"), (int, float)) else "-"
        sps = f"{t['samples_per_s']:.1f}" if isinstance(t.get("samples_per_s"), (int, float)) else "-"
        rows.append(f"{peer.name:<6} {t['state']:<10} {_dash(t.get('step')):>6} {_dash(t.get('epoch')):>11} "
                    f"{loss:>8} {sps:>10} {_dash(t.get('checkpoint_step')):>6} {st['peers']:>5}")
    return "\n".join(rows)


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


@click.command()
@click.option("--peers", "count", type=click.IntRange(1, 8), default=3, show_default=True, help="Daemons to start.")
@click.option("--dir", "root", type=click.Path(file_okay=False, path_type=Path),
              help="Where the peers' state dirs live (reuse it to resume). [a new dir under /tmp]")
@click.option("--spec", "spec_file", type=click.File("r"), help="Run spec to use. [the built-in demo.toml]")
@click.option("--batch-size", type=click.IntRange(1), help="Per-step batch size of every peer. [the spec's demo default]")
def demo(count: int, root: Path | None, spec_file: Any, batch_size: int | None) -> None:
    """Run a local swarm of N peers training the demo model together, until Ctrl-C."""
    # Short paths: unix socket paths are limited to 107 bytes.
    root = (root or Path(tempfile.mkdtemp(prefix="hmdemo-", dir="/tmp"))).absolute()
    spec_text, spec_name = (spec_file.read(), spec_file.name) if spec_file else _demo_spec()
    (root / "discovery").mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // count)
    click.echo(f"starting {count} daemons under {root} (logs: {root}/peerN/daemon.log) …")
    peers: list[LocalPeer] = []
    try:
        peers.append(LocalPeer(root, 0, root / "discovery", threads))
        peers[0].wait_ready(time.monotonic() + 120)
        peers += [LocalPeer(root, i, root / "discovery", threads) for i in range(1, count)]
        for peer in peers[1:]:
            peer.wait_ready(time.monotonic() + 120)
        for i, peer in enumerate(peers):
            request = JoinRequest(run_id=RUN_ID, spec_toml=spec_text if i == 0 else None, spec_source=spec_name,
                                  device="cpu", batch_size=batch_size)
            try:
                peer.client.call("join", request.to_body())
            except ApiError as exc:
                raise click.ClickException(f"{peer.name} could not join: {exc}") from None
        click.echo(f"all {count} peers joined run {RUN_ID!r}; Ctrl-C stops them (each checkpoints first)\n")
        _watch(peers)
    except KeyboardInterrupt:
        pass
    finally:
        click.echo("\nstopping the swarm (trainers checkpoint first) …")
        for peer in peers:
            peer.stop()
        for peer in peers:
            peer.reap(timeout=90)
        click.echo(f"stopped; state kept in {root} (run `hivemindd demo --dir {root}` to resume)")


def _watch(peers: list[LocalPeer]) -> None:
    tty = sys.stdout.isatty()
    while True:
        table = render(peers)
        if tty:
            click.echo("\x1b[H\x1b[J" + table + "\n\nCtrl-C to stop")
        else:
            click.echo(table + "\n")
        for peer in peers:
            if peer.proc.poll() is not None:
                raise click.ClickException(f"{peer.name} exited with {peer.proc.returncode}; see {peer.log_path}")
        time.sleep(1.0 if tty else 5.0)  # refresh interval of the live view
