"""The one error type that means "fix the spec, launch file or data; restarting will not help"."""

from __future__ import annotations


class ConfigError(Exception):
    """A problem a restart will not fix; the trainer exits with code 2 after an "error" event.

    The message is one line a human can act on and starts with the key at fault,
    e.g. ``data.train: no shards match /x/train-{0..3}.tar``.
    """
