"""The error types that mean "fix the spec, launch file or data; restarting will not help"."""

from __future__ import annotations


class ConfigError(Exception):
    """A problem a restart will not fix; the trainer exits with code 2 after an "error" event.

    The message is one line a human can act on and starts with the key at fault,
    e.g. ``data.train: no shards match /x/train-{0..3}.tar``.
    """


class NoReadableShards(ConfigError):
    """Every shard (or folder-tree file) drawn in a row failed: the data location is gone or wrong."""
