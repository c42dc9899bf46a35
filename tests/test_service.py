"""`hivemindd service install|uninstall` and the shipped units/plists: what systemd and launchd will accept."""

from __future__ import annotations

import os
import plistlib
import pwd
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from hivemindd.daemon import main
from hivemindd.service.install import spec_for_this_machine
from hivemindd.service.units import MARKER, PACKAGED_COMMAND, render, shipped_files
from tests.support.repo import REPO

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze missing: apt-get install systemd (CI installs it)")
ME = pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def run(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(main, ["service", *args], catch_exceptions=False)


def verify(unit_text: str, tmp: Path, user: bool = False) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` on ``unit_text``; the packaged ExecStart (/opt/…) is pointed at a stub that exists."""
    stub = tmp / "stub-bin" / "hivemindd"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    unit = tmp / "units" / "hivemindd.service"
    unit.parent.mkdir(exist_ok=True)
    unit.write_text(unit_text.replace(PACKAGED_COMMAND[0], str(stub)))
    runtime = tmp / "rt"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))  # a user manager needs one, even offline
    assert SYSTEMD_ANALYZE is not None
    cmd = [SYSTEMD_ANALYZE, *(["--user"] if user else []), "verify", "--man=no", str(unit)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


def assert_verifies(unit_text: str, tmp: Path, user: bool = False) -> None:
    result = verify(unit_text, tmp, user)
    # verify only warns (exit 0) on unknown keys and unsafe settings: any output is a failure here.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def unit_settings(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if re.match(r"^[A-Z]\w*=", line))


# --- shipped files --------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", sorted(shipped_files()))
def test_shipped_files_match_the_generator(rel: str) -> None:
    assert (REPO / rel).read_bytes() == shipped_files()[rel], \
        f"{rel} is stale: run `python -m hivemindd.service` to rewrite systemd/ and launchd/"


@needs_systemd_analyze
@pytest.mark.parametrize("name,user", [("hivemindd.service", False), ("hivemindd-user.service", True)])
def test_shipped_units_pass_systemd_analyze_verify(short_tmp: Path, name: str, user: bool) -> None:
    assert_verifies((REPO / "systemd" / name).read_text(), short_tmp, user)


@needs_systemd_analyze
def test_verify_catches_a_broken_unit(short_tmp: Path) -> None:
    """The checker itself: a typo in a key and a missing binary are both reported."""
    text = (REPO / "systemd" / "hivemindd.service").read_text()
    assert "WatchdogSecs" in verify(text.replace("WatchdogSec=", "WatchdogSecs="), short_tmp).stderr
    broken = verify(text.replace(PACKAGED_COMMAND[0], "/nonexistent/hm"), short_tmp)
    assert broken.returncode != 0 and "/nonexistent/hm" in broken.stderr


def test_system_unit_is_type_notify_hardened_and_lets_gpus_through() -> None:
    text = (REPO / "systemd" / "hivemindd.service").read_text()
    s = unit_settings(text)
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main" and int(s["WatchdogSec"]) > 0
    assert s["ExecStart"].split() == [*PACKAGED_COMMAND, "--state-dir", "/var/lib/hivemindd",
                                      "--socket", "/run/hivemindd/hivemindd.sock"]
    assert s["RuntimeDirectory"] == s["StateDirectory"] == "hivemindd"
    assert s["User"] == "hivemind" and s["Restart"] == "on-failure" and s["KillMode"] == "mixed"
    assert int(s["TimeoutStopSec"]) >= 150 + 20, "must outlast the trainer's 150 s checkpoint-on-stop"
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes", "ProtectHome": "yes"}.items():
        assert s[key] == value, key
    for closes_devices in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock", "MemoryDenyWriteExecute"):
        assert closes_devices not in s, f"{closes_devices} would lock CUDA out"


def test_user_unit_keeps_the_foreground_state_dir() -> None:
    s = unit_settings((REPO / "systemd" / "hivemindd-user.service").read_text())
    assert s["Type"] == "notify" and "User" not in s and "SupplementaryGroups" not in s
    assert s["ExecStart"].split()[1:] == ["--state-dir", "%S/hivemindd"]  # = ~/.local/state/hivemindd, hmctl's default
    assert "PrivateTmp" not in s, "mount namespacing fails in user managers without user namespaces"


def check_plist(data: bytes, daemon: bool) -> dict[str, object]:
    plist = plistlib.loads(data)
    for key in ("Label", "ProgramArguments", "RunAtLoad", "KeepAlive", "StandardOutPath", "StandardErrorPath",
                "ExitTimeOut"):
        assert key in plist, key
    args = plist["ProgramArguments"]
    assert isinstance(args, list) and args[0].startswith("/")
    for key in ("StandardOutPath", "StandardErrorPath", "WorkingDirectory"):
        assert str(plist[key]).startswith("/"), f"{key} must be absolute: launchd expands no ~"
    for flag in ("--state-dir", "--socket", "--config"):
        if flag in args:
            assert args[args.index(flag) + 1].startswith("/"), flag
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] == {"SuccessfulExit": False}
    assert isinstance(plist["ExitTimeOut"], int) and plist["ExitTimeOut"] > 150
    assert ("UserName" in plist) is daemon
    assert "--daemonize" not in args and "-d" not in args
    return plist


def test_shipped_plists_have_what_launchd_needs() -> None:
    daemon = check_plist((REPO / "launchd" / "org.hivemindd.daemon.plist").read_bytes(), daemon=True)
    assert daemon["Label"] == "org.hivemindd.daemon" and daemon["UserName"] == "_hivemind"
    agent = check_plist((REPO / "launchd" / "org.hivemindd.agent.plist").read_bytes(), daemon=False)
    assert agent["Label"] == "org.hivemindd.agent"


# --- generated for this machine ---------------------------------------------------------------------


@needs_systemd_analyze
def test_generated_units_verify_and_name_this_install(runner: CliRunner, short_tmp: Path) -> None:
    system = run(runner, "install", "--dir", str(short_tmp / "sys"), "--run-as", ME, "--manager", "systemd")
    user = run(runner, "install", "--user", "--dir", str(short_tmp / "user"), "--manager", "systemd")
    assert system.exit_code == 0 and user.exit_code == 0, system.output + user.output
    for folder, is_user in (("sys", False), ("user", True)):
        text = (short_tmp / folder / "hivemindd.service").read_text()
        assert_verifies(text, short_tmp, is_user)
        exe = unit_settings(text)["ExecStart"].split()[0]
        assert os.path.isabs(exe) and os.access(exe, os.X_OK)
        assert Path(exe).parent == Path(sys.executable).parent, "the interpreter/entry point of this install"
    assert "systemctl daemon-reload && systemctl enable --now hivemindd" in system.output
    assert "systemctl --user daemon-reload && systemctl --user enable --now hivemindd" in user.output


@needs_systemd_analyze
def test_config_file_sizes_the_stop_timeout(runner: CliRunner, short_tmp: Path) -> None:
    config = short_tmp / "hivemindd.toml"
    config.write_text("stop_timeout = 600\n")
    result = run(runner, "install", "--dir", str(short_tmp), "--run-as", ME, "--config", str(config),
                 "--manager", "systemd")
    assert result.exit_code == 0, result.output
    text = (short_tmp / "hivemindd.service").read_text()
    s = unit_settings(text)
    assert int(s["TimeoutStopSec"]) >= 620
    assert s["ExecStart"].endswith(f"--config {config}")
    assert_verifies(text, short_tmp)


def test_bad_config_file_is_named(runner: CliRunner, short_tmp: Path) -> None:
    config = short_tmp / "bad.toml"
    config.write_text("stop_timout = 600\n")
    result = run(runner, "install", "--dir", str(short_tmp), "--config", str(config))
    assert result.exit_code == 1 and "stop_timout" in result.output and "stop_timeout" in result.output
    assert not (short_tmp / "hivemindd.service").exists()


@pytest.mark.parametrize("user", [False, True], ids=["daemon", "agent"])
def test_generated_plists(runner: CliRunner, short_tmp: Path, user: bool) -> None:
    args = ["install", "--manager", "launchd", "--dir", str(short_tmp)] + (["--user"] if user else [])
    result = run(runner, *args)
    assert result.exit_code == 0, result.output
    name = "org.hivemindd.agent.plist" if user else "org.hivemindd.daemon.plist"
    data = (short_tmp / name).read_bytes()
    assert MARKER.encode() in data
    plist = check_plist(data, daemon=not user)
    assert Path(plist["ProgramArguments"][0]).parent == Path(sys.executable).parent  # type: ignore[index]
    expected = "launchctl bootstrap gui/$(id -u)" if user else "sudo launchctl bootstrap system"
    assert expected in result.output


# --- install / uninstall behaviour -----------------------------------------------------------------


@pytest.fixture
def installed(runner: CliRunner, short_tmp: Path) -> Iterator[Path]:
    result = run(runner, "install", "--dir", str(short_tmp), "--manager", "systemd")
    assert result.exit_code == 0 and "written" in result.output, result.output
    yield short_tmp / "hivemindd.service"


def test_same_content_is_already_installed(runner: CliRunner, installed: Path) -> None:
    before = installed.stat().st_mtime_ns
    again = run(runner, "install", "--dir", str(installed.parent), "--manager", "systemd")
    assert again.exit_code == 0 and "already installed" in again.output
    assert installed.stat().st_mtime_ns == before


def test_a_changed_file_is_kept_without_force(runner: CliRunner, installed: Path) -> None:
    edited = installed.read_text().replace("RestartSec=5", "RestartSec=30")  # an admin's local change
    installed.write_text(edited)
    refused = run(runner, "install", "--dir", str(installed.parent), "--manager", "systemd")
    assert refused.exit_code == 1
    assert str(installed) in refused.output and "--force" in refused.output and "RestartSec=30" in refused.output
    assert installed.read_text() == edited, "nothing the admin wrote may be lost"
    forced = run(runner, "install", "--dir", str(installed.parent), "--manager", "systemd", "--force")
    assert forced.exit_code == 0 and "replaced" in forced.output
    assert "RestartSec=5" in installed.read_text()


def test_dry_run_writes_nothing(runner: CliRunner, short_tmp: Path) -> None:
    result = run(runner, "install", "--dry-run", "--dir", str(short_tmp), "--manager", "systemd")
    assert result.exit_code == 0
    assert f"would write {short_tmp / 'hivemindd.service'}" in result.output and "Type=notify" in result.output
    assert list(short_tmp.iterdir()) == []


def test_uninstall_removes_its_own_file_and_enable_link(runner: CliRunner, installed: Path) -> None:
    wants = installed.parent / "multi-user.target.wants"
    wants.mkdir()
    (wants / "hivemindd.service").symlink_to(installed)  # what `systemctl enable` made
    result = run(runner, "uninstall", "--dir", str(installed.parent), "--manager", "systemd")
    assert result.exit_code == 0, result.output
    assert not installed.exists() and not (wants / "hivemindd.service").is_symlink()
    assert "systemctl stop hivemindd" in result.output and "daemon-reload" in result.output
    again = run(runner, "uninstall", "--dir", str(installed.parent), "--manager", "systemd")
    assert again.exit_code == 0 and "not installed" in again.output


def test_uninstall_leaves_a_foreign_file_alone(runner: CliRunner, short_tmp: Path) -> None:
    foreign = short_tmp / "hivemindd.service"
    foreign.write_text("[Service]\nExecStart=/usr/bin/true\n")  # a packager's or an admin's unit
    result = run(runner, "uninstall", "--dir", str(short_tmp), "--manager", "systemd")
    assert result.exit_code == 1 and "not written by" in result.output
    assert foreign.read_text() == "[Service]\nExecStart=/usr/bin/true\n"


def test_run_as_with_user_is_refused(runner: CliRunner, short_tmp: Path) -> None:
    result = runner.invoke(main, ["service", "install", "--user", "--run-as", "x", "--dir", str(short_tmp)])
    assert result.exit_code == 2 and "--run-as" in result.output


def test_permission_denied_suggests_sudo_or_user(short_tmp: Path) -> None:
    """As a user who cannot write the folder: exit 77 and a message that says what to do."""
    short_tmp.chmod(0o755)  # reachable, so the write itself is what fails
    target = short_tmp / "locked"
    target.mkdir(mode=0o755)
    code, output = _as_unprivileged(["service", "install", "--dir", str(target), "--manager", "systemd"], target)
    assert code == 77, output
    assert "permission denied" in output and "sudo" in output and "--user" in output
    assert list(target.iterdir()) == []


def _as_unprivileged(args: list[str], locked: Path) -> tuple[int, str]:
    """Run the CLI in a forked child that cannot write ``locked`` (root drops to nobody; others get 0555)."""
    if os.geteuid() != 0:
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        result = CliRunner().invoke(main, args)
        locked.chmod(0o755)
        return result.exit_code, result.output
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become nobody, run, report through the pipe, never return into pytest
        code = 70
        try:
            os.close(read_fd)
            nobody = pwd.getpwnam("nobody")
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            result = CliRunner().invoke(main, args)
            code = result.exit_code
            os.write(write_fd, result.output.encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        output = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output


def test_render_is_deterministic() -> None:
    spec = spec_for_this_machine("systemd", False, ME, None)
    assert render(spec) == render(spec_for_this_machine("systemd", False, ME, None))
