"""Configuration precedence: defaults < config file < HIVEMINDD_* environment < flags."""

from pathlib import Path
from typing import Any

import pytest

from hivemindd.daemon import main
from hivemindd.host.config import ConfigError, build_config, read_config_file


def parse_flags(args: list[str]) -> dict[str, Any]:
    """What click hands the daemon for these args and the current environment."""
    ctx = main.make_context("hivemindd", args, auto_envvar_prefix="HIVEMINDD", resilient_parsing=False)
    return dict(ctx.params)


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(
        f'state_dir = "{tmp_path}/from-file"\nheartbeat = 7\nttl = 100\nlog_format = "json"\n'
        '[host]\ndevice = "cpu"\nbatch_size = 16\n'
    )
    monkeypatch.setenv("HIVEMINDD_HEARTBEAT", "9")
    monkeypatch.setenv("HIVEMINDD_TTL", "50")
    cfg = build_config(parse_flags(["--config", str(cfg_file), "--ttl", "40"]))
    assert cfg.state_dir == tmp_path / "from-file"  # file beats default
    assert cfg.heartbeat_s == 9  # env beats file
    assert cfg.ttl_s == 40  # flag beats env
    assert cfg.log_format == "json"
    assert cfg.host_defaults.device == "cpu" and cfg.host_defaults.batch_size == 16
    assert cfg.socket == tmp_path / "from-file" / "hivemindd.sock"
    assert cfg.discovery == (tmp_path / "from-file" / "discovery").as_uri()


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    cfg = build_config(parse_flags([]))
    assert cfg.state_dir == tmp_path / ".local/state/hivemindd"
    assert cfg.heartbeat_s == 30 and cfg.ttl_s == 90
    assert cfg.host_maddrs == ("/ip4/127.0.0.1/tcp/0",)


def test_repeatable_flags_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HIVEMINDD_INITIAL_PEER", "/ip4/127.0.0.1/tcp/1/p2p/A /ip4/127.0.0.1/tcp/2/p2p/B")
    cfg = build_config(parse_flags(["--state-dir", str(tmp_path), "--host-maddr", "/ip4/0.0.0.0/tcp/31337",
                                    "--host-maddr", "/ip6/::/tcp/31337"]))
    assert cfg.host_maddrs == ("/ip4/0.0.0.0/tcp/31337", "/ip6/::/tcp/31337")
    assert cfg.initial_peers == ("/ip4/127.0.0.1/tcp/1/p2p/A", "/ip4/127.0.0.1/tcp/2/p2p/B")


@pytest.mark.parametrize("body, message", [
    ("heartbeet = 3\n", "unknown key 'heartbeet' (did you mean 'heartbeat'?)"),
    ("heartbeat = 'often'\n", "heartbeat has the wrong type"),
    ("initial_peers = [1]\n", "initial_peers must be a list of strings"),
    ("[host]\ndevice = 'tpu'\n", "host.device must be one of"),
    ("state_dir = \n", "not valid TOML"),
])
def test_bad_config_file_is_named(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as err:
        build_config({"config": str(path), "state_dir": str(tmp_path)})
    assert message in str(err.value) and "bad.toml" in str(err.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        read_config_file(tmp_path / "absent.toml")


def test_socket_path_too_long_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="shorter --socket"):
        build_config({"state_dir": str(tmp_path), "socket": "/tmp/" + "s" * 120})


def test_ttl_shorter_than_heartbeat_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ttl"):
        build_config({"state_dir": str(tmp_path), "heartbeat": 10.0, "ttl": 5.0})


def test_operator_group_and_http_from_file_env_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HIVEMINDD_OPERATOR_GROUP", raising=False)
    monkeypatch.delenv("HIVEMINDD_HTTP", raising=False)
    cfg = build_config(parse_flags(["--state-dir", str(tmp_path)]))
    assert cfg.operator_group == "hivemind" and cfg.http is None and not cfg.http_allow_remote
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('operator_group = "staff"\nhttp = "127.0.0.1:8080"\nhttp_allow_remote = true\n')
    cfg = build_config(parse_flags(["--config", str(cfg_file)]))
    assert cfg.operator_group == "staff" and cfg.http == ("127.0.0.1", 8080) and cfg.http_allow_remote
    monkeypatch.setenv("HIVEMINDD_OPERATOR_GROUP", "trainers")
    cfg = build_config(parse_flags(["--config", str(cfg_file), "--http", "[::1]:0"]))
    assert cfg.operator_group == "trainers" and cfg.http == ("::1", 0) and cfg.http_is_loopback
    assert not build_config(parse_flags(["--state-dir", str(tmp_path), "--http", "10.0.0.1:80"])).http_is_loopback


@pytest.mark.parametrize("flags, message", [
    (["--http", "8080"], "http must be HOST:PORT"),
    (["--http", "127.0.0.1:99999"], "http must be HOST:PORT"),
    (["--http", "host.example:80"], "not an IP address"),
    (["--operator-group", "bad group"], "not a group name"),
])
def test_bad_operator_group_or_http_is_named(tmp_path: Path, flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(parse_flags(["--state-dir", str(tmp_path), *flags]))


def test_http_allow_remote_must_be_a_boolean_in_the_file(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('http_allow_remote = "yes"\n')
    with pytest.raises(ConfigError, match="http_allow_remote has the wrong type"):
        read_config_file(cfg_file)


def test_help_shows_the_defaults_the_config_really_has() -> None:
    """Defaults are written once, in DaemonConfig and HostSettings; --help reads them from there."""
    from click.testing import CliRunner

    from hivemindd.cli import main as hmctl
    from hivemindd.daemon import main as hivemindd
    from hivemindd.host.config import DaemonConfig
    from hivemindd.wire.launch import HostSettings

    shown = " ".join(CliRunner().invoke(hivemindd, ["--help"], terminal_width=400).output.split())
    for value in (DaemonConfig.heartbeat_s, DaemonConfig.stop_timeout_s, DaemonConfig.hang_timeout_s,
                  DaemonConfig.crashloop_cooldown_s):
        assert f"[{value:g}]" in shown, (value, shown)
    assert f"[{DaemonConfig.operator_group}]" in shown and f"[{DaemonConfig.host_maddrs[0]}]" in shown
    join = " ".join(CliRunner().invoke(hmctl, ["join", "--help"], terminal_width=400).output.split())
    host = HostSettings()
    assert f"[{host.device}]" in join and f"[{host.batch_size}]" in join and f"[{host.workers}]" in join, join
