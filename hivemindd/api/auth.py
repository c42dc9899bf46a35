"""Who is on the other end of the control socket, and what they may do.

As tailscaled does, the daemon asks the kernel for the caller's identity
(``SO_PEERCRED`` on Linux, ``getpeereid`` on macOS and the BSDs) instead of
trusting file permissions alone: root, the daemon's own user and members of the
operator group get full control; any other local user may read status only.
Where the platform offers no peer credentials the socket stays 0660 and file
permissions keep everyone else out.

On the optional loopback TCP listener there is no kernel to ask: a bearer token
(``LoopbackSecrets``) gives full control, and the dashboard's browser holds a
``DashboardSession`` instead, never the token itself. Pure stdlib.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import grp
import hashlib
import hmac
import os
import pwd
import secrets
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

DEFAULT_OPERATOR_GROUP = "hivemind"
SESSION_TTL_S = 12 * 3600  # a working day: then the owner opens `hmctl dashboard`'s address again
MAX_SESSIONS = 32  # logins beyond this push out the oldest session
MIN_TOKEN_CHARS = 32  # state.load_or_create_token makes longer ones; a shorter file is not taken as a new token


class Access(enum.Enum):
    READ = "read"  # the routes marked read_only (status without log lines, peers, swarm, history, metrics)
    FULL = "full"  # everything: join, leave, pause, resume, logs


@dataclass(frozen=True)
class PeerCredentials:
    """The connecting process's effective uid and gid (and pid where the kernel says)."""

    uid: int
    gid: int
    pid: int | None = None


class _SockLike(Protocol):
    def fileno(self) -> int: ...
    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...


def identity_check_available(platform: str = sys.platform) -> bool:
    """Whether this platform tells a unix-socket server who connected."""
    return platform.startswith("linux") or platform == "darwin" or "bsd" in platform


def peer_credentials(sock: _SockLike, platform: str = sys.platform) -> PeerCredentials:
    """The caller's credentials; OSError when the kernel will not say (never a guess)."""
    if platform.startswith("linux"):
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))  # type: ignore[attr-defined,unused-ignore]
        pid, uid, gid = struct.unpack("3i", raw)
        return PeerCredentials(uid=uid, gid=gid, pid=pid)
    if identity_check_available(platform):
        return _getpeereid(sock.fileno())
    raise OSError(f"no peer credentials on {platform}")


def _getpeereid(fd: int) -> PeerCredentials:
    """macOS/BSD: getpeereid(2) (LOCAL_PEERCRED underneath); the stdlib has no wrapper, so ctypes."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
    if libc.getpeereid(fd, ctypes.byref(uid), ctypes.byref(gid)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"getpeereid: {os.strerror(err)}")
    return PeerCredentials(uid=uid.value, gid=gid.value)


def decide(uid: int, gids: set[int], daemon_uid: int, operator_gid: int | None) -> Access:
    """The rule itself: root, the daemon's user and operator-group members control; others read."""
    if uid == 0 or uid == daemon_uid:
        return Access.FULL
    if operator_gid is not None and operator_gid in gids:
        return Access.FULL
    return Access.READ


def groups_of(uid: int, primary_gid: int) -> set[int]:
    """All groups of ``uid`` as the group database says now, so `usermod -aG` counts without a new login."""
    try:
        user = pwd.getpwuid(uid)
    except KeyError:  # a uid with no passwd entry (containers): only what the kernel told us
        return {primary_gid}
    return {primary_gid, *os.getgrouplist(user.pw_name, user.pw_gid)}


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@dataclass(frozen=True)
class Authorizer:
    """Applies ``decide`` to a connected caller, looking the operator group up at each call."""

    operator_group: str = DEFAULT_OPERATOR_GROUP
    daemon_uid: int = field(default_factory=os.geteuid)

    def operator_gid(self) -> int | None:
        try:
            return grp.getgrnam(self.operator_group).gr_gid
        except KeyError:
            return None

    def access(self, creds: PeerCredentials) -> Access:
        if creds.uid in (0, self.daemon_uid):
            return Access.FULL  # no group lookups on the common path
        return decide(creds.uid, groups_of(creds.uid, creds.gid), self.daemon_uid, self.operator_gid())

    def refusal(self, creds: PeerCredentials | None) -> str:
        """What a read-only caller is told: which group to join, and how."""
        who = "this caller" if creds is None else f"user {user_name(creds.uid)!r} (uid {creds.uid})"
        group = self.operator_group
        how = f"sudo usermod -aG {group} $USER"
        if self.operator_gid() is None:
            how = f"sudo groupadd {group} && {how}"
        return (f"{who} may only read status here: to control hivemindd, join the operator group "
                f"{group!r} (`{how}`), or run as {user_name(self.daemon_uid)!r} or root")


@dataclass(frozen=True)
class DashboardSession:
    """What ``GET /?token=`` trades the token for: ``id`` goes in an HttpOnly cookie, ``control_key``
    to the page's script only (in the address's fragment, which a browser never sends anywhere).

    A browser attaches the cookie to requests for every port of the host, so another local
    web server can see ``id``; ``control_key`` lives in the tab's sessionStorage, which no
    other origin can read. Hence the cookie alone only reads; control needs both.
    """

    id: str
    control_key: str
    expires: float  # on the secrets' clock (monotonic)
    generation: int  # the token it was made under: a new token ends it


class LoopbackSecrets:
    """The TCP listener's bearer token and the dashboard sessions made from it.

    The token file is checked (one ``stat``) at every use: writing a new token into it
    replaces the token at once, and every session made under the old one ends.
    Sessions live in memory only, so a restarted daemon knows none of them.
    """

    def __init__(self, token_file: Path, token: str, ttl_s: float = SESSION_TTL_S, max_sessions: int = MAX_SESSIONS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.token_file = token_file
        self._token = token
        self._seen = self._signature()
        self._generation = 0
        self._ttl_s = ttl_s
        self._max = max_sessions
        self._clock = clock
        self._sessions: dict[bytes, DashboardSession] = {}  # keyed by a digest: lookups leak nothing of an id

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.token_file)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def token(self) -> str:
        """The bearer token now: re-read when its file changed (a rotation ends every session)."""
        seen = self._signature()
        if seen is not None and seen != self._seen:
            self._seen = seen
            try:
                new = self.token_file.read_text().strip()
            except (OSError, UnicodeDecodeError):
                new = ""
            if len(new) >= MIN_TOKEN_CHARS and new != self._token:
                self._token = new
                self._generation += 1
                self._sessions.clear()
        return self._token

    def is_token(self, given: str) -> bool:
        """Whether ``given`` is the bearer token (constant time)."""
        return hmac.compare_digest(given.encode(errors="replace"), self.token().encode())

    def open_session(self) -> DashboardSession:
        """A new random session (the caller has just shown the token)."""
        self.token()
        now = self._clock()
        self._drop_expired(now)
        while len(self._sessions) >= self._max:
            del self._sessions[min(self._sessions, key=lambda k: self._sessions[k].expires)]
        session = DashboardSession(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now + self._ttl_s,
                                   self._generation)
        self._sessions[_digest(session.id)] = session
        return session

    def session(self, session_id: str) -> DashboardSession | None:
        """The live session with this id, or None (unknown, expired, or made under an older token)."""
        self.token()
        session = self._sessions.get(_digest(session_id))
        if session is None:
            return None
        if session.expires <= self._clock() or session.generation != self._generation:
            self._sessions.pop(_digest(session_id), None)
            return None
        return session

    def _drop_expired(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[key]

    @property
    def ttl_s(self) -> float:
        return self._ttl_s


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode(errors="replace")).digest()
