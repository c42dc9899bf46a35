"""Scaffolding the tests share, written once here instead of copied or imported from a test module.

- ``dirs``: ``short_dir``, a temp dir whose path leaves room for unix sockets.
- ``waiting``: ``wait_until``, the one way to wait for a condition (a deadline, and what it waited for).
- ``specs``: ``spec_toml``, the small run the daemon tests train, with changes on top.
- ``daemons``: ``DaemonProcess`` (one real hivemindd in a subprocess), ``daemon_at`` (one that is
  always reaped), ``seed_paused_run`` (a state dir joined to a run but paused) and the checks that
  no process outlives its test.
- ``repo``: where the checkout is, and ``check_schema`` against the control API's schema.
- ``users``: acting as another uid (needs root).
- ``systemd``: a stand-in for systemd's notify socket.

Fixtures stay in the ``conftest.py`` files and in the test files, built from these. Tests that
start real daemons live in tests/e2e/. Nothing here imports a test module.
"""
