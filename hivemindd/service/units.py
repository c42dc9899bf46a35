"""What the systemd unit and the launchd plists say: rendered from a ``ServiceSpec``, nothing else read.

``hivemindd service install`` (service.py) fills the spec with the facts of
this install and writes the result; ``shipped_files`` renders the same files
for a packaged install (``systemd/`` and ``launchd/`` in the source tree).
"""

from __future__ import annotations

import plistlib
from dataclasses import dataclass
from typing import Any

from hivemindd.host.config import DaemonConfig

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
