"""The daemon's typed configuration: defaults < config file (TOML) < HIVEMINDD_* env < flags.

Flags and environment variables arrive together from click (a flag beats its
variable there); ``build_config`` lays them over the file and the defaults.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hivemindd.api.auth import DEFAULT_OPERATOR_GROUP
from hivemindd.wire.launch import HostSettings

SOCKET_PATH_LIMIT = 107  # sun_path is 108 bytes with the terminating NUL


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and where it came from."""


@dataclass(frozen=True)
class DaemonConfig:
    """Everything the daemon needs, built once in ``daemon.main`` and passed down."""

    state_dir: Path
    socket: Path
    discovery: str
    host_maddrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    announce_maddrs: tuple[str, ...] = ()
    initial_peers: tuple[str, ...] = ()
    log_format: str = "console"
    log_level: str = "info"  # debug also lets hivemind's INFO/DEBUG lines through (daemon.configure_logging)
    heartbeat_s: float = 30.0
    ttl_s: float = 90.0
    stop_timeout_s: float = 150.0  # a stop may wait out a step in flight and a goodbye: 2 x averaging_timeout (60 s) + margin
    # A trainer silent this long is hung; it must outlast the longest quiet phase (a full validation
    # pass, downloading state from peers, a slow averaging round).
    hang_timeout_s: float = 900.0
    crashloop_cooldown_s: float = 300.0  # a trainer that keeps failing is retried this often
    host_defaults: HostSettings = field(default_factory=HostSettings)
    operator_group: str = DEFAULT_OPERATOR_GROUP  # members get full control over the socket
    http: tuple[str, int] | None = None  # optional TCP listener (host, port) for the dashboard; loopback only
    http_allow_remote: bool = False  # let ``http`` bind a non-loopback address (the token is then all that guards it)
    # [host] data_roots: a run spec's local data must lie under these folders; () = anywhere but the refused ones
    data_roots: tuple[str, ...] = ()
    allow_local_urls: bool = False  # [host] allow_local_urls: spec URLs may reach loopback and link-local hosts

    @property
    def http_is_loopback(self) -> bool:
        return self.http is None or is_loopback(self.http[0])


def default_state_dir() -> Path:
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "hivemindd"


# Keys a config file may hold, with their type check; ``host`` is a table of HostSettings.
_FILE_KEYS: dict[str, type | tuple[type, ...]] = {
    "state_dir": str,
    "socket": str,
    "discovery": str,
    "host_maddrs": list,
    "announce_maddrs": list,
    "initial_peers": list,
    "log_format": str,
    "log_level": str,
    "heartbeat": (int, float),
    "ttl": (int, float),
    "stop_timeout": (int, float),
    "hang_timeout": (int, float),
    "crashloop_cooldown": (int, float),
    "host": dict,
    "operator_group": str,
    "http": str,
    "http_allow_remote": bool,
}

_GROUP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_http_address(text: str) -> tuple[str, int]:
    """``127.0.0.1:8080`` or ``[::1]:8080`` (port 0: any free port) as (host, port)."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"http must be HOST:PORT like 127.0.0.1:8080, got {text!r}")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"http: {host!r} is not an IP address (use 127.0.0.1 or [::1])") from None
    return host, int(port)


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse and type-check a TOML config file (keys as in ``_FILE_KEYS``)."""
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for key, value in raw.items():
        if key not in _FILE_KEYS:
            close = difflib.get_close_matches(key, list(_FILE_KEYS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r}{hint}")
        expected = _FILE_KEYS[key]
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise ConfigError(f"{path}: {key} has the wrong type ({type(value).__name__})")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}: {key} must be a list of strings")
    return raw


def build_config(cli: dict[str, Any]) -> DaemonConfig:
    """Merge flags/env (``cli``: None or empty tuple = not given) over the config file and defaults."""
    file_values = read_config_file(Path(cli["config"])) if cli.get("config") else {}

    def pick(key: str, file_key: str | None = None) -> Any:
        value = cli.get(key)
        if value is not None and value != ():
            return value
        return file_values.get(file_key or key)

    state_dir = Path(pick("state_dir") or default_state_dir()).expanduser().absolute()
    socket = Path(pick("socket") or state_dir / "hivemindd.sock").expanduser().absolute()
    if len(os.fsencode(socket)) > SOCKET_PATH_LIMIT:
        raise ConfigError(
            f"socket path {socket} is {len(os.fsencode(socket))} bytes; unix sockets allow {SOCKET_PATH_LIMIT}: "
            "pass a shorter --socket"
        )
    discovery = pick("discovery") or (state_dir / "discovery").as_uri()
    log_format = pick("log_format") or "console"
    if log_format not in ("console", "json"):
        raise ConfigError(f"log_format must be 'console' or 'json', got {log_format!r}")
    log_level = pick("log_level") or "info"
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level must be 'debug', 'info', 'warning' or 'error', got {log_level!r}")
    heartbeat = float(pick("heartbeat") or 30.0)
    ttl = float(pick("ttl") or 3 * heartbeat)
    stop_timeout = float(pick("stop_timeout") or DaemonConfig.stop_timeout_s)
    hang_timeout = float(pick("hang_timeout") or DaemonConfig.hang_timeout_s)
    cooldown = float(pick("crashloop_cooldown") or DaemonConfig.crashloop_cooldown_s)
    for name, value in (("heartbeat", heartbeat), ("ttl", ttl), ("stop_timeout", stop_timeout),
                        ("hang_timeout", hang_timeout), ("crashloop_cooldown", cooldown)):
        if not value > 0:
            raise ConfigError(f"{name} must be > 0 seconds, got {value}")
    if ttl < heartbeat:
        raise ConfigError(f"ttl ({ttl} s) must be at least one heartbeat ({heartbeat} s), or peers flap")
    host_table = dict(file_values.get("host", {}))
    data_roots = _data_roots(host_table.pop("data_roots", []), cli.get("config"))
    allow_local_urls = host_table.pop("allow_local_urls", False)
    if not isinstance(allow_local_urls, bool):
        raise ConfigError(f"{cli.get('config')}: host.allow_local_urls must be true or false")
    host_defaults = HostSettings.from_dict(host_table)
    if host_defaults.problems():
        key, message = host_defaults.problems()[0]
        raise ConfigError(f"{cli.get('config')}: host.{key} {message}")
    maddrs = tuple(pick("host_maddr", "host_maddrs") or ("/ip4/127.0.0.1/tcp/0",))
    operator_group = pick("operator_group") or DEFAULT_OPERATOR_GROUP
    if not _GROUP_NAME.fullmatch(operator_group):
        raise ConfigError(f"operator_group {operator_group!r} is not a group name")
    http = pick("http")
    allow_remote = cli.get("http_allow_remote") or file_values.get("http_allow_remote", False)  # a flag: False = not given
    return DaemonConfig(
        state_dir=state_dir,
        socket=socket,
        discovery=discovery,
        host_maddrs=maddrs,
        announce_maddrs=tuple(pick("announce_maddr", "announce_maddrs") or ()),
        initial_peers=tuple(pick("initial_peer", "initial_peers") or ()),
        log_format=log_format,
        log_level=log_level,
        heartbeat_s=heartbeat,
        ttl_s=ttl,
        stop_timeout_s=stop_timeout,
        hang_timeout_s=hang_timeout,
        crashloop_cooldown_s=cooldown,
        host_defaults=host_defaults,
        operator_group=operator_group,
        http=parse_http_address(http) if http else None,
        http_allow_remote=bool(allow_remote),
        data_roots=data_roots,
        allow_local_urls=allow_local_urls,
    )


def _data_roots(value: Any, source: str | None) -> tuple[str, ...]:
    """``[host] data_roots``: absolute folders (``~`` expanded) that confine a spec's local data reads."""
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{source}: host.data_roots must be a list of folders")
    roots = tuple(os.path.expanduser(v) for v in value)
    for root in roots:
        if not os.path.isabs(root):
            raise ConfigError(f"{source}: host.data_roots: {root!r} is not an absolute path")
    return roots
