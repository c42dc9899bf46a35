"""Acting as another local user: real other credentials for the control API's checks (needs root)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

NOBODY = 65534  # in group nogroup (65534) through its primary gid: an operator where nogroup is the operator group
STRANGER = 65533  # no passwd entry, no groups: read-only
IS_ROOT = os.geteuid() == 0


def as_user(uid: int, action: Callable[[], Any]) -> Any:
    """Run ``action`` in a forked child that became ``uid`` (gid ``uid``, no other groups): real other credentials.

    Forked rather than exec'ed because this interpreter may live where other users cannot read it.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges for good, act, report, and leave without cleanup
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            assert os.geteuid() == uid
            outcome = {"ok": action()}
        except BaseException as exc:
            outcome = {"error": repr(exc)}
        os.write(write_fd, json.dumps(outcome).encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        raw = pipe.read()
    os.waitpid(pid, 0)
    outcome = json.loads(raw)
    assert "error" not in outcome, outcome["error"]
    return outcome["ok"]
