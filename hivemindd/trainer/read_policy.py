"""What a run spec may make this host read: which local files, which URL hosts.

A spec comes from whoever can write the discovery store, so the places it names are
checked where the trainer (or predict) opens them:

- Local paths are resolved (symlinks followed) and refused under ``/proc``, ``/sys``,
  ``/dev`` and the daemon's own state directory (its identity key, API token and
  every run's files), except the cache under it, where the trainer itself writes demo
  shards and folder indexes. With ``[host] data_roots`` set, local reads must also lie
  in one of those folders (default: unconfined, so shared folders and local datasets
  keep working).
- Only regular files are read: a FIFO would block a reader forever, ``/dev/zero``
  never ends. Files are opened with ``O_NONBLOCK`` and checked on the descriptor.
- ``http(s)://`` connections are refused to loopback, link-local and unspecified
  addresses and to cloud metadata services (``169.254.169.254``) unless the host set
  ``[host] allow_local_urls``. The address is checked on every connection actually
  made, after DNS resolution and on every redirect, not on the URL's text.

The trainer installs the policy of its launch once at start (``install``); readers
that run in loader workers carry a copy (``current()`` at construction).
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import stat
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from hivemindd.trainer.errors import ConfigError
from hivemindd.wire.launch import TrainerLaunch

SYSTEM_DIRS = ("/proc", "/sys", "/dev")
# Metadata services that are not link-local: AWS's IPv6 endpoint, Alibaba Cloud's.
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("fd00:ec2::254"), ipaddress.ip_address("100.100.100.200")})


class ReadRefused(ConfigError):
    """A location the host's read policy does not let a run spec read; the message names the rule."""


@dataclass(frozen=True)
class ReadPolicy:
    """The host's rules for what a spec may read (see the module docstring)."""

    state_dir: str = ""  # refused, except cache_dir inside it
    cache_dir: str = ""  # always readable: the trainer's own generated data
    data_roots: tuple[str, ...] = ()  # empty: any folder but the refused ones
    allow_local_urls: bool = False

    def check_local(self, path: str | os.PathLike[str]) -> Path:
        """The resolved path if a spec may read ``path``; ReadRefused naming the rule if not."""
        real = Path(os.path.realpath(os.path.expanduser(os.fspath(path))))
        for folder in SYSTEM_DIRS:
            if _under(real, Path(folder)):
                raise ReadRefused(f"{path}: a run spec may not read {folder}")
        cache = Path(os.path.realpath(self.cache_dir)) if self.cache_dir else None
        if cache is not None and _under(real, cache):
            return real
        if self.state_dir and _under(real, Path(os.path.realpath(self.state_dir))):
            raise ReadRefused(f"{path}: a run spec may not read this host's state directory {self.state_dir}")
        if self.data_roots and not any(_under(real, Path(os.path.realpath(root))) for root in self.data_roots):
            raise ReadRefused(f"{path}: outside this host's data_roots ({', '.join(self.data_roots)}); the operator "
                              "confined local data to those folders")
        return real

    def check_address(self, host: str, address: str) -> None:
        """ReadRefused if ``address`` (what ``host`` resolved to) is one a spec may not make this host connect to."""
        if self.allow_local_urls:
            return
        why = refused_address(address)
        if why is not None:
            raise ReadRefused(f"{host} is {address}, a {why} address: a run spec may not make this host fetch from "
                              "loopback, link-local or metadata addresses (an operator can allow loopback and "
                              "link-local with [host] allow_local_urls = true)")


def refused_address(address: str) -> str | None:
    """Why a spec's URL may not reach ``address`` ("loopback", "link-local" …), or None."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return "cloud metadata"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_unspecified:
        return "unspecified (this host)"
    return None


def for_launch(launch: TrainerLaunch) -> ReadPolicy:
    """The read policy the daemon handed this trainer."""
    return ReadPolicy(state_dir=launch.state_dir, cache_dir=launch.cache_dir, data_roots=launch.data_roots,
                      allow_local_urls=launch.allow_local_urls)


def _under(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


_policy = ReadPolicy()


def install(policy: ReadPolicy) -> None:
    """Make ``policy`` this process's (the trainer does this once, from its launch)."""
    global _policy
    _policy = policy


def current() -> ReadPolicy:
    return _policy


def open_local(path: str | os.PathLike[str], policy: ReadPolicy | None = None) -> IO[bytes]:
    """A regular file a spec may read, opened for reading; ReadRefused or OSError otherwise."""
    real = (policy or _policy).check_local(path)
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ReadRefused(f"{path} is not a regular file (only regular files are read)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_local(path: str | os.PathLike[str], limit: int, policy: ReadPolicy | None = None) -> bytes:
    """The whole of a regular file a spec may read, at most ``limit`` bytes (ReadRefused when larger)."""
    with open_local(path, policy) as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise ReadRefused(f"{path} is larger than {limit} bytes")
    return data


# --- URLs -------------------------------------------------------------------------------------

def url_opener(policy: ReadPolicy | None = None) -> urllib.request.OpenerDirector:
    """A urllib opener whose every connection (redirects included) is checked against ``policy``."""
    checked = policy or _policy

    class Http(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(_connection_class(http.client.HTTPConnection, checked), req)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(_connection_class(http.client.HTTPSConnection, checked), req,
                                context=self._context)  # type: ignore[attr-defined]

    return urllib.request.build_opener(Http, Https)


def _connection_class(base: type[http.client.HTTPConnection], policy: ReadPolicy) -> Any:
    class Checked(base):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = lambda address, timeout, source=None: _connect(address, timeout, source,
                                                                                     policy)

    return Checked


def _connect(address: tuple[str, int], timeout: Any, source: tuple[str, int] | None,
             policy: ReadPolicy) -> socket.socket:
    """socket.create_connection, but only to addresses the policy allows (checked after resolution)."""
    host, port = address
    refused: ReadRefused | None = None
    failed: OSError | None = None
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        try:
            policy.check_address(host, str(sockaddr[0]))
        except ReadRefused as exc:
            refused = refused or exc
            continue
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not getattr(socket, "_GLOBAL_DEFAULT_TIMEOUT", object()):
                sock.settimeout(timeout)
            if source:
                sock.bind(source)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            failed = exc
    if failed is not None:
        raise failed
    if refused is not None:
        raise refused
    raise OSError(f"{host}: no address to connect to")
