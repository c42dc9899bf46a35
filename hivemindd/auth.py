"""Who is on the other end of the control socket, and what they may do.

As tailscaled does, the daemon asks the kernel for the caller's identity
(``SO_PEERCRED`` on Linux, ``getpeereid`` on macOS and the BSDs) instead of
trusting file permissions alone: root, the daemon's own user and members of the
operator group get full control; any other local user may read status only.
Where the platform offers no peer credentials the socket stays 0660 and file
permissions keep everyone else out. Pure stdlib.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import grp
import os
import pwd
import socket
import struct
import sys
from dataclasses import dataclass, field
from typing import Protocol

DEFAULT_OPERATOR_GROUP = "hivemind"


class Access(enum.Enum):
    READ = "read"  # status and peers only
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
