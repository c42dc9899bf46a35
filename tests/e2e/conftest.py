"""The e2e tests' scaffolding lives in tests/support/; import it from there.

These names stay importable from here only for bench/late_joiner.py, written before the
move; drop this re-export once it imports tests.support instead.
"""

from tests.support.daemons import DaemonProcess
from tests.support.specs import spec_toml
from tests.support.waiting import wait_until

TEST_SPEC = spec_toml()

__all__ = ["TEST_SPEC", "DaemonProcess", "wait_until"]
