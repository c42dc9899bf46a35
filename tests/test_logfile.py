"""The trainer log rotates by size and its tail survives daemon restarts."""

from pathlib import Path

from hivemindd.logfile import TrainerLog


def test_tail_follow_and_rotation(tmp_path: Path) -> None:
    log = TrainerLog(tmp_path / "trainer.log", max_bytes=200, keep=2)
    for i in range(100):
        log.write(f"line {i:03d}")
    assert log.tail(3) == ["line 097", "line 098", "line 099"]
    assert [line for _, line in log.after(99, 10)] == ["line 099"]  # seq is 1-based
    assert log.seq == 100
    rotated = sorted(p.name for p in tmp_path.iterdir())
    assert rotated == ["trainer.log", "trainer.log.1", "trainer.log.2"]  # capped at `keep` old files
    assert all(p.stat().st_size <= 220 for p in tmp_path.iterdir())
    log.close()
    reopened = TrainerLog(tmp_path / "trainer.log", max_bytes=200, keep=2)
    assert reopened.tail(2) == ["line 098", "line 099"]  # read back from disk after a restart
    assert len(reopened.tail(15)) == 15  # spans the rotated file
    reopened.close()
