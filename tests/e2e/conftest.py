"""Tests that start real daemons and trainers in subprocesses; their scaffolding lives in tests/support/."""
