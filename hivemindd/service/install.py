"""``hivemindd service install|uninstall``: run this install of hivemindd under systemd or launchd.

The unit (Linux) or plist (macOS) is generated (units.py), not copied: it names the
interpreter and entry point of *this* install by absolute path, sizes the stop
timeout from the daemon's own stop grace, and adds only groups this machine
has. ``systemd/`` and ``launchd/`` in the source tree hold the same files
rendered for a packaged install (``python -m hivemindd.service`` rewrites them;
a test keeps them in step).

A file is never replaced unless it is byte-identical ("already installed") or
``--force`` is given, and ``uninstall`` removes only a file carrying our marker.
"""

from __future__ import annotations

import difflib
import grp
import os
import pwd
import shlex
import sys
from pathlib import Path
from typing import Any

import click

from hivemindd.host.config import ConfigError, DaemonConfig, build_config, default_state_dir
from hivemindd.host.statedir import write_atomic
from hivemindd.service.units import (
    AGENT_LABEL,
    DAEMON_LABEL,
    LINUX_SOCKET,
    LINUX_STATE_DIR,
    MACOS_LOG,
    MACOS_SOCKET,
    MACOS_STATE_DIR,
    MARKER,
    SYSTEM_USER,
    ServiceSpec,
    render,
    shipped_files,
)
from hivemindd.wire.protocol import EX_FAILURE, EX_NOPERM


class ServiceError(click.ClickException):
    """An install/uninstall that cannot go ahead; the message says what to do instead."""

    exit_code = EX_FAILURE

    def show(self, file: Any = None) -> None:
        click.echo(f"hivemindd service: {self.message}", err=True)


class ServicePermissionError(ServiceError):
    exit_code = EX_NOPERM


# --- facts of this install -----------------------------------------------------------------------


def daemon_command() -> tuple[str, ...]:
    """The absolute command that starts this install's daemon: its entry-point script, else ``python -m``."""
    python = Path(os.path.abspath(sys.executable))  # not resolved: a venv's python is a symlink that must stay one
    script = python.with_name("hivemindd")
    if script.is_file() and os.access(script, os.X_OK):
        return (str(script),)
    return (str(python), "-m", "hivemindd.daemon")


def _under_home(paths: list[str]) -> bool:
    return any(p == d or p.startswith(d + "/") for p in paths for d in ("/home", "/root", "/run/user"))


def _existing_groups() -> tuple[str, ...]:
    """GPU device groups that exist here: a SupplementaryGroups= naming a missing group fails the start."""
    found = []
    for name in ("video", "render"):
        try:
            grp.getgrnam(name)
            found.append(name)
        except KeyError:
            pass
    return tuple(found)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def spec_for_this_machine(manager: str, user_scope: bool, run_as: str | None, config: str | None) -> ServiceSpec:
    command = daemon_command()
    stop_timeout = DaemonConfig.stop_timeout_s
    if config is not None:
        config = os.path.abspath(config)
        try:
            stop_timeout = build_config({"config": config}).stop_timeout_s
        except ConfigError as exc:
            raise ServiceError(f"--config: {exc}") from None
    import hivemindd

    package_dir = str(Path(hivemindd.__file__).resolve().parent)
    return ServiceSpec(
        manager=manager, user_scope=user_scope, command=command, run_as=run_as or SYSTEM_USER[manager],
        stop_timeout_s=stop_timeout, config=config,
        protect_home="read-only" if _under_home([*command, package_dir, config or ""]) else "yes",
        groups=_existing_groups(), home=str(Path.home()), state_dir=str(default_state_dir()),
    )




# --- where files go and what to run next ---------------------------------------------------------


def default_dir(manager: str, user_scope: bool) -> Path:
    if manager == "systemd":
        if user_scope:
            xdg = os.environ.get("XDG_CONFIG_HOME")
            return (Path(xdg) if xdg else Path.home() / ".config") / "systemd" / "user"
        return Path("/etc/systemd/system")
    return Path.home() / "Library" / "LaunchAgents" if user_scope else Path("/Library/LaunchDaemons")


def next_steps(spec: ServiceSpec, path: Path) -> list[str]:
    sudo = "" if os.geteuid() == 0 else "sudo "
    steps = []
    if spec.manager == "systemd" and spec.user_scope:
        steps += [
            "systemctl --user daemon-reload && systemctl --user enable --now hivemindd",
            f"loginctl enable-linger {pwd.getpwuid(os.getuid()).pw_name}   # keep it running when you log out",
            "systemctl --user status hivemindd ; journalctl --user -u hivemindd -f",
        ]
    elif spec.manager == "systemd":
        if not _user_exists(spec.run_as):
            groups = f" --groups {','.join(spec.groups)}" if spec.groups else ""
            steps.append(f"{sudo}useradd --system --user-group --home-dir {LINUX_STATE_DIR} --shell /usr/sbin/nologin"
                         f"{groups} {spec.run_as}")
        me = os.environ.get("SUDO_USER") or pwd.getpwuid(os.getuid()).pw_name
        if me != "root":
            steps.append(f"{sudo}usermod -aG {spec.run_as} {me}   # lets you use hmctl (log in again)")
        steps += [
            f"{sudo}systemctl daemon-reload && {sudo}systemctl enable --now hivemindd",
            f"export HIVEMINDD_SOCKET={LINUX_SOCKET}   # where hmctl finds this daemon",
            "systemctl status hivemindd ; journalctl -u hivemindd -f",
        ]
    elif spec.user_scope:
        steps += [
            f"launchctl bootstrap gui/$(id -u) {shlex.quote(str(path))}",
            f"tail -f {shlex.quote((spec.home or '~') + '/Library/Logs/hivemindd.log')}",
        ]
    else:
        if not _user_exists(spec.run_as):
            steps += [
                f"sudo dscl . -create /Users/{spec.run_as} UniqueID 420   # any free id below 500",
                f"sudo dscl . -create /Users/{spec.run_as} PrimaryGroupID 20",
                f"sudo dscl . -create /Users/{spec.run_as} UserShell /usr/bin/false",
                f"sudo dscl . -create /Users/{spec.run_as} NFSHomeDirectory {MACOS_STATE_DIR}",
            ]
        dirs = f"{MACOS_STATE_DIR} {os.path.dirname(MACOS_SOCKET)} {os.path.dirname(MACOS_LOG)}"
        steps += [
            f"sudo mkdir -p {dirs} && sudo chown {spec.run_as} {dirs}",
            f"sudo launchctl bootstrap system {shlex.quote(str(path))}",
            f"export HIVEMINDD_SOCKET={MACOS_SOCKET}   # where hmctl finds this daemon",
        ]
    return steps


def undo_steps(spec: ServiceSpec) -> list[str]:
    sudo = "" if os.geteuid() == 0 else "sudo "
    if spec.manager == "systemd" and spec.user_scope:
        return ["systemctl --user stop hivemindd ; systemctl --user daemon-reload"]
    if spec.manager == "systemd":
        return [f"{sudo}systemctl stop hivemindd ; {sudo}systemctl daemon-reload"]
    if spec.user_scope:
        return [f"launchctl bootout gui/$(id -u)/{AGENT_LABEL}"]
    return [f"sudo launchctl bootout system/{DAEMON_LABEL}"]


# --- install / uninstall ---------------------------------------------------------------------------


def _write(path: Path, content: bytes, force: bool) -> str:
    """Write the file unless a different one is there; returns what happened."""
    try:
        current = path.read_bytes() if path.exists() else None
    except PermissionError:
        raise _denied(path, "read") from None
    if current == content:
        return "already installed"
    if current is not None and not force:
        diff = difflib.unified_diff(current.decode(errors="replace").splitlines(), content.decode().splitlines(),
                                    str(path), "would write", lineterm="", n=1)
        shown = "\n".join(list(diff)[:40])
        raise ServiceError(f"{path} exists and differs from what this install would write:\n{shown}\n"
                           "keep it, or pass --force to replace it")
    try:
        write_atomic(path, content, mode=0o644)
    except PermissionError:
        raise _denied(path, "write") from None
    except OSError as exc:
        raise ServiceError(f"cannot write {path}: {exc.strerror or exc}") from None
    return "replaced" if current is not None else "written"


def _denied(path: Path, verb: str) -> ServiceError:
    return ServicePermissionError(f"permission denied: cannot {verb} {path}. Run it with sudo for the system "
                                  "service, or install a per-user service with --user (or choose a folder with --dir).")


def _wants_link(path: Path, spec: ServiceSpec) -> Path:
    target = "default.target.wants" if spec.user_scope else "multi-user.target.wants"
    return path.parent / target / path.name


@click.group()
def service() -> None:
    """Install hivemindd as a systemd service (Linux) or a launchd job (macOS)."""


_MANAGER = click.option("--manager", type=click.Choice(["systemd", "launchd"]),
                        default=lambda: "launchd" if sys.platform == "darwin" else "systemd",
                        help="Which service manager to write for. [launchd on macOS, else systemd]")
_DIR = click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
                    help="Folder to write to (tests, packagers). [/etc/systemd/system, ~/.config/systemd/user, "
                         "/Library/LaunchDaemons, ~/Library/LaunchAgents]")
_USER = click.option("--user", "user_scope", is_flag=True,
                     help="A per-user service (systemd --user / LaunchAgent) instead of the system one.")


@service.command()
@_USER
@click.option("--force", is_flag=True, help="Replace an existing file that differs.")
@click.option("--dry-run", is_flag=True, help="Print the file and where it would go; write nothing.")
@click.option("--run-as", help="The system service's dedicated user. [hivemind; _hivemind on macOS]")
@click.option("--config", type=click.Path(dir_okay=False, exists=True), help="Config file the daemon should read.")
@_DIR
@_MANAGER
def install(user_scope: bool, force: bool, dry_run: bool, run_as: str | None, config: str | None,
            directory: Path | None, manager: str) -> None:
    """Write the unit/plist for this install and print the commands that start it."""
    if run_as and user_scope:
        raise click.UsageError("--run-as is for the system service; a --user service runs as you")
    spec = spec_for_this_machine(manager, user_scope, run_as, config)
    path = (directory or default_dir(manager, user_scope)).absolute() / spec.filename
    content = render(spec)
    if dry_run:
        click.echo(f"# would write {path}")
        click.echo(content.decode(), nl=False)
        return
    outcome = _write(path, content, force)
    click.echo(f"{path}: {outcome}")
    if spec.protect_home == "read-only" and not user_scope:
        click.echo(f"note: this install lives under a home directory; user {spec.run_as} must be able to read it "
                   "(a venv in /opt/hivemindd avoids that).", err=True)
    click.echo("next:")
    for step in next_steps(spec, path):
        click.echo(f"  {step}")


@service.command()
@_USER
@_DIR
@_MANAGER
def uninstall(user_scope: bool, directory: Path | None, manager: str) -> None:
    """Remove the unit/plist that `service install` wrote (and its enable link); print what to run."""
    spec = ServiceSpec(manager=manager, user_scope=user_scope, command=())
    path = (directory or default_dir(manager, user_scope)).absolute() / spec.filename
    try:
        if not path.exists():
            click.echo(f"{path}: not installed, nothing to remove")
            return
        if MARKER.encode() not in path.read_bytes():
            raise ServiceError(f"{path} was not written by `hivemindd service install` (no marker line); "
                               "leaving it alone: remove it yourself if you mean to")
        link = _wants_link(path, spec)
        if spec.manager == "systemd" and link.is_symlink() and os.path.realpath(link) == os.path.realpath(path):
            link.unlink()  # what `systemctl disable` would remove; a dangling link would fail every boot
            click.echo(f"{link}: removed")
        path.unlink()
    except PermissionError:
        raise _denied(path, "remove") from None
    click.echo(f"{path}: removed")
    click.echo("next:")
    for step in undo_steps(spec):
        click.echo(f"  {step}")


def write_shipped(root: Path) -> None:
    for rel, content in shipped_files().items():
        write_atomic(root / rel, content, mode=0o644)
        print(f"wrote {rel}")
