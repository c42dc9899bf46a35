"""The trainer log rotates by size and its tail survives daemon restarts."""

from pathlib import Path

from hivemindd.host.logfile import TrainerLog


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


ISO_MS_UTC = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def test_every_line_we_write_starts_with_one_timestamp_format(tmp_path: Path) -> None:
    import logging
    import re
    import time

    from hivemindd.host.logfile import line_time
    from hivemindd.wire.logformat import IsoFormatter, iso_time

    assert iso_time(1738332300.1239) == "2025-01-31T14:05:00.123Z"  # UTC, milliseconds truncated
    log = TrainerLog(tmp_path / "trainer.log")
    before = time.time()
    log.note("trainer running -> stopping: left the run")
    note = log.tail(1)[0]
    assert re.match(ISO_MS_UTC + r" \[hivemindd\] trainer running -> stopping", note), note
    stamp = line_time(note)
    assert stamp is not None and before - 0.002 <= stamp <= time.time()
    log.close()
    record = logging.LogRecord("hivemindd.trainer.loop", logging.INFO, __file__, 1, "step=%d", (5,), None)
    record.created = 1738332300.5
    line = IsoFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s").format(record)
    assert line == "2025-01-31T14:05:00.500Z INFO hivemindd.trainer.loop: step=5"
    assert line_time(line) == 1738332300.5
