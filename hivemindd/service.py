"""``hivemindd service install|uninstall``: run this install of hivemindd under systemd or launchd.

The unit (Linux) or plist (macOS) is generated, not copied: it names the
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
import plistlib
import pwd
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from hivemindd.config import ConfigError, DaemonConfig, build_config, default_state_dir
from hivemindd.protocol import EX_FAILURE, EX_NOPERM
from hivemindd.state import write_atomic

MARKER = "Written by `hivemindd service install`"  # uninstall removes only files that carry it
SHIPPED = "Shipped with hivemindd for packaged installs"
UNIT_NAME = "hivemindd.service"
DAEMON_LABEL = "org.hivemindd.daemon"
AGENT_LABEL = "org.hivemindd.agent"
STOP_MARGIN_S = 30  # past the trainer's grace: withdraw the discovery record, stop the DHT
WATCHDOG_S = 60  # the loop pings every 30 s; a minute of silence means it is wedged
SYSTEM_USER = {"systemd": "hivemind", "launchd": "_hivemind"}
PACKAGED_COMMAND = ("/opt/hivemindd/bin/hivemindd",)  # the README's system-wide venv
# The system unit's fixed places (systemd creates them: StateDirectory=, RuntimeDirectory=).
LINUX_STATE_DIR = "/var/lib/hivemindd"
LINUX_SOCKET = "/run/hivemindd/hivemindd.sock"
# macOS has no /run that survives reboots and that the daemon's user could create a folder in.
MACOS_STATE_DIR = "/usr/local/var/hivemindd"
MACOS_SOCKET = "/usr/local/var/run/hivemindd/hivemindd.sock"
MACOS_LOG = "/Library/Logs/hivemindd/hivemindd.log"


class ServiceError(click.ClickException):
    """An install/uninstall that cannot go ahead; the message says what to do instead."""

    exit_code = EX_FAILURE

    def show(self, file: Any = None) -> None:
        click.echo(f"hivemindd service: {self.message}", err=True)


class ServicePermissionError(ServiceError):
    exit_code = EX_NOPERM


@dataclass(frozen=True)
class ServiceSpec:
    """What to render: which manager, which scope, and the facts of this install."""

    manager: str  # "systemd" or "launchd"
    user_scope: bool
    command: tuple[str, ...]  # absolute argv that starts the daemon
    run_as: str = "hivemind"  # system scope only
    stop_timeout_s: float = DaemonConfig.stop_timeout_s
    config: str | None = None  # absolute --config path passed to the daemon
    protect_home: str = "yes"  # "read-only" when the install itself lives under a home directory
    groups: tuple[str, ...] = ("video",)
    home: str | None = None  # launchd agent: the user's home (logs)
    state_dir: str | None = None  # launchd agent: the daemon's default state dir, spelled out
    header: str = MARKER

    @property
    def filename(self) -> str:
        if self.manager == "systemd":
            return UNIT_NAME
        return f"{AGENT_LABEL if self.user_scope else DAEMON_LABEL}.plist"

    @property
    def stop_grace_s(self) -> int:
        return int(self.stop_timeout_s + STOP_MARGIN_S + 0.999)


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


# --- rendering ------------------------------------------------------------------------------------


def _systemd_quote(arg: str) -> str:
    """One ExecStart= word: '%' and '$' are systemd's own, spaces need quotes."""
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if any(c in escaped for c in " \t\"'\\;"):
        return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return escaped


def render_systemd(spec: ServiceSpec) -> str:
    argv = [_systemd_quote(a) for a in spec.command]
    # A user unit's %S is $XDG_STATE_HOME (~/.local/state): the foreground default, so hmctl needs no flags.
    argv += ["--state-dir", "%S/hivemindd"] if spec.user_scope else ["--state-dir", LINUX_STATE_DIR, "--socket", LINUX_SOCKET]
    if spec.config:
        argv += ["--config", _systemd_quote(spec.config)]
    lines = [
        f"# {spec.header}.",
        "# hivemindd: the per-host daemon that trains one model together with other machines.",
        "# Drive it with hmctl" + (" (same socket as in the foreground)." if spec.user_scope
                                   else f" (HIVEMINDD_SOCKET={LINUX_SOCKET}; join group {spec.run_as})."),
        "",
        "[Unit]",
        "Description=hivemindd: collaborative training daemon" + (" (user)" if spec.user_scope else ""),
        "After=network-online.target",
        "Wants=network-online.target",
        "# Restart=on-failure, but a daemon that fails 5 times in 5 minutes is left stopped for a person to look at.",
        "StartLimitIntervalSec=300",
        "StartLimitBurst=5",
        "",
        "[Service]",
        "# READY=1 once the control API and the DHT are up; STATUS= one-line summaries; WATCHDOG=1 from the event loop.",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={' '.join(argv)}",
        f"WatchdogSec={WATCHDOG_S}",
        "Restart=on-failure",
        "RestartSec=5",
        "# Exit 78 (EX_CONFIG) is a bad configuration: restarting cannot fix it.",
        "RestartPreventExitStatus=78",
        "# hivemind imports torch and starts p2pd before READY: slow disks need more than the default 90 s.",
        "TimeoutStartSec=120",
        f"# The trainer gets stop_timeout ({spec.stop_timeout_s:g} s) to checkpoint and leave, then the daemon",
        f"# withdraws its discovery record and stops the DHT: {STOP_MARGIN_S} s of margin before SIGKILL.",
        f"TimeoutStopSec={spec.stop_grace_s}",
        "# SIGTERM to the daemon only: it stops the trainer itself, in order. SIGTERM to the whole cgroup would hit",
        "# the trainer's DHT and p2pd mid-goodbye. Whatever is left when the daemon exits gets SIGKILL.",
        "KillMode=mixed",
        "StateDirectory=hivemindd",
        "StateDirectoryMode=0700",
    ]
    if not spec.user_scope:
        lines += [
            "# Torch hub and friends cache under $XDG_CACHE_HOME: keep it in the writable state directory.",
            "Environment=XDG_CACHE_HOME=%S/hivemindd/.cache",
            "# The control socket lives here; 0755 so operators can reach the socket (itself 0660, group "
            f"{spec.run_as}).",
            "RuntimeDirectory=hivemindd",
            "RuntimeDirectoryMode=0755",
            f"User={spec.run_as}",  # no Group=: the primary group, which `useradd --user-group` names the same
        ]
        if spec.groups:
            lines += [
                "# GPU device nodes: /dev/nvidia* are usually 0666, but some distributions make them 0660 group",
                "# video; /dev/dri/renderD* and /dev/kfd (ROCm) belong to render. Only groups present on this host.",
                f"SupplementaryGroups={' '.join(spec.groups)}",
            ]
        lines += [
            "",
            "# --- hardening that still lets CUDA through -------------------------------------------------------",
            "# No PrivateDevices=, DevicePolicy= or DeviceAllow=: /dev/nvidia0…N, nvidiactl, nvidia-uvm and",
            "# nvidia-caps/* must stay reachable, and their names differ per host. ProtectClock= is left off for the",
            "# same reason (it implies DeviceAllow=char-rtc, which closes every other device).",
            "# No MemoryDenyWriteExecute=: CUDA and PyTorch JIT-compile kernels into writable+executable memory.",
            "# No PrivateUsers=: device groups would be unmapped. No SystemCallFilter=: the NVIDIA driver's ioctls.",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            f"ProtectHome={spec.protect_home}",
            "PrivateTmp=yes",
            "ProtectKernelTunables=yes",
            "# Load nvidia and nvidia_uvm at boot (nvidia-persistenced, or /etc/modules-load.d): the service cannot.",
            "ProtectKernelModules=yes",
            "ProtectKernelLogs=yes",
            "ProtectControlGroups=yes",
            "ProtectHostname=yes",
            "RestrictNamespaces=yes",
            "RestrictRealtime=yes",
            "RestrictSUIDSGID=yes",
            "LockPersonality=yes",
            "SystemCallArchitectures=native",
            "# p2pd lists interfaces over netlink; the trainer and the DHT talk TCP/UDP; hmctl uses a unix socket.",
            "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
            "CapabilityBoundingSet=",
            "UMask=0027",
            "# A file:// discovery folder or a dataset outside the state directory needs, in a drop-in",
            "# (systemctl edit hivemindd): ReadWritePaths=/mnt/shared/hivemind  (or ReadOnlyPaths= for data).",
        ]
    else:
        lines += [
            "",
            "# A user manager cannot set up mount namespaces (ProtectSystem=, PrivateTmp=) without user namespaces;",
            "# these seccomp-based guards work everywhere and leave GPU devices alone.",
            "NoNewPrivileges=yes",
            "RestrictNamespaces=yes",
            "RestrictRealtime=yes",
            "LockPersonality=yes",
            "SystemCallArchitectures=native",
            "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        ]
    lines += ["", "[Install]", f"WantedBy={'default.target' if spec.user_scope else 'multi-user.target'}", ""]
    return "\n".join(lines)


def render_launchd(spec: ServiceSpec) -> bytes:
    args = list(spec.command)
    if spec.user_scope:
        # launchd expands no '~': a generated agent names the user's home; the shipped template logs to /tmp.
        log = f"{spec.home}/Library/Logs/hivemindd.log" if spec.home else "/tmp/hivemindd-agent.log"
        if spec.state_dir:  # the daemon's own default, spelled out: hmctl finds the socket there
            args += ["--state-dir", spec.state_dir]
        workdir = spec.home or "/"
    else:
        log = MACOS_LOG
        args += ["--state-dir", MACOS_STATE_DIR, "--socket", MACOS_SOCKET]
        workdir = MACOS_STATE_DIR
    if spec.config:
        args += ["--config", spec.config]
    plist: dict[str, Any] = {
        "Label": AGENT_LABEL if spec.user_scope else DAEMON_LABEL,
        "ProgramArguments": args,
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 10,
        "ExitTimeOut": spec.stop_grace_s,
        "ProcessType": "Standard",
        "WorkingDirectory": workdir,
        "StandardOutPath": log,
        "StandardErrorPath": log,
        "EnvironmentVariables": {"PYTHONUNBUFFERED": "1"},
    }
    if not spec.user_scope:
        plist["UserName"] = spec.run_as
    comment = (
        f"<!-- {spec.header}.\n"
        "     hivemindd runs in the foreground (it never forks itself), so launchd tracks the right process.\n"
        "     KeepAlive/SuccessfulExit=false restarts it after a crash but not after a clean stop.\n"
        f"     ExitTimeOut ({spec.stop_grace_s} s) covers the trainer's checkpoint-on-stop "
        f"({spec.stop_timeout_s:g} s) plus margin:\n"
        "     launchd's default of 20 s would SIGKILL a trainer mid-checkpoint.\n"
        "     ProcessType=Standard: Background would throttle the trainer's CPU and I/O. -->\n"
    )
    assert "--" not in comment[4:-4], "XML comments may not contain '--'"
    body = plistlib.dumps(plist, sort_keys=False).decode()
    head, sep, rest = body.partition('<plist version="1.0">\n')
    return (head + comment + sep + rest).encode()


def render(spec: ServiceSpec) -> bytes:
    return render_systemd(spec).encode() if spec.manager == "systemd" else render_launchd(spec)


def shipped_files() -> dict[str, bytes]:
    """The files in ``systemd/`` and ``launchd/``, rendered for the packaged install (/opt/hivemindd)."""
    base = ServiceSpec(manager="systemd", user_scope=False, command=PACKAGED_COMMAND, header=SHIPPED)
    return {
        "systemd/hivemindd.service": render(base),
        "systemd/hivemindd-user.service": render(ServiceSpec(
            manager="systemd", user_scope=True, command=PACKAGED_COMMAND, header=SHIPPED)),
        "launchd/org.hivemindd.daemon.plist": render(ServiceSpec(
            manager="launchd", user_scope=False, command=("/usr/local/bin/hivemindd",), run_as="_hivemind",
            header=SHIPPED)),
        # No --state-dir: an agent has HOME, so the daemon's default (~/.local/state/hivemindd) applies.
        "launchd/org.hivemindd.agent.plist": render(ServiceSpec(
            manager="launchd", user_scope=True, command=("/usr/local/bin/hivemindd",),
            header=SHIPPED + " (`hivemindd service install` run as you writes one logging to ~/Library/Logs)")),
    }


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


def _write_shipped(root: Path) -> None:
    for rel, content in shipped_files().items():
        write_atomic(root / rel, content, mode=0o644)
        print(f"wrote {rel}")


if __name__ == "__main__":  # python -m hivemindd.service: refresh systemd/ and launchd/ in the source tree
    _write_shipped(Path(__file__).resolve().parents[1])
