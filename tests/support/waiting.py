"""Waiting for a condition: poll it until a deadline, and say what was awaited when it never came.

Never sleep-and-hope: the tests share two busy cores, so a fixed sleep is either too short
on a slow run or wasted on a fast one. Give generous deadlines; a met condition returns at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2,
               describe: Callable[[], Any] | None = None) -> T:
    """Poll ``probe`` until it returns something truthy and return that; fail naming ``what`` on timeout.

    ``describe``: what to show of the world when it times out, where the probe's own last
    answer (None, False) says nothing.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    seen = f"; {describe()!r}" if describe is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r}{seen})")
