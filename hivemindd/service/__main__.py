"""``python -m hivemindd.service``: rewrite the shipped systemd/ and launchd/ files in the source tree."""

from pathlib import Path

from hivemindd.service.install import write_shipped

if __name__ == "__main__":
    write_shipped(Path(__file__).resolve().parents[2])
