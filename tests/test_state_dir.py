"""The state directory is private to the daemon's user, also when it existed before (issue 11, item 15)."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest

from hivemindd.host.config import build_config
from hivemindd.host.core import Daemon, StartupError
from hivemindd.host.statedir import StatePaths


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_state_dir_is_private(tmp_path: Path) -> None:
    StatePaths(tmp_path / "new/state").make_root()
    assert mode(tmp_path / "new/state") == 0o700


def test_the_daemon_tightens_an_existing_state_dir_that_others_can_read(tmp_path: Path) -> None:
    state_dir = tmp_path / "s"
    state_dir.mkdir()
    state_dir.chmod(0o755)  # made by hand, or by an older version
    (state_dir / "state.json").write_text("{not json")  # start() stops right after the directory is set up
    daemon = Daemon(build_config({"state_dir": str(state_dir)}))

    async def start_and_stop() -> None:
        try:
            with pytest.raises(StartupError, match=r"state\.json"):
                await daemon.start()
        finally:
            await daemon.stop()

    asyncio.run(start_and_stop())
    assert mode(state_dir) == 0o700
