"""What a run spec may make a host read (issue 11 item 6): no state dir, /proc, /sys or /dev; only regular
files; only [host] data_roots when set; no loopback, link-local or metadata URLs unless the host allows them."""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hivemindd.host.config import ConfigError as DaemonConfigError
from hivemindd.host.config import build_config
from hivemindd.trainer import data, folder_tree, read_policy
from hivemindd.trainer.errors import ConfigError
from hivemindd.trainer.read_policy import ReadPolicy, ReadRefused, refused_address
from hivemindd.wire.launch import HostSettings, TrainerLaunch
from hivemindd.wire.spec import parse_toml
from tests.test_data import make_shard


@pytest.fixture
def policy() -> Iterator[None]:
    """Restore this process's read policy after a test installs one."""
    before = read_policy.current()
    yield
    read_policy.install(before)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    root = tmp_path / "state"
    (root / "cache").mkdir(parents=True)
    (root / "identity.key").write_bytes(b"secret key")
    (root / "http.token").write_text("token")
    return root


def test_the_state_dir_is_refused_but_its_cache_is_not(state: Path, tmp_path: Path) -> None:
    rules = ReadPolicy(state_dir=str(state), cache_dir=str(state / "cache"))
    with pytest.raises(ReadRefused, match="may not read this host's state directory"):
        rules.check_local(state / "identity.key")
    os.symlink(state / "http.token", tmp_path / "innocent.json")  # a link from anywhere is followed first
    with pytest.raises(ReadRefused, match="state directory"):
        rules.check_local(tmp_path / "innocent.json")
    with pytest.raises(ReadRefused, match="state directory"):
        rules.check_local(state / "cache" / ".." / "identity.key")
    assert rules.check_local(state / "cache" / "demo.tar") == (state / "cache" / "demo.tar").resolve()
    assert rules.check_local(tmp_path / "data.tar") == (tmp_path / "data.tar").resolve()


@pytest.mark.parametrize("path", ["/proc/self/environ", "/sys/kernel", "/dev/zero", "/dev/stdin"])
def test_system_folders_are_refused_whatever_the_roots(path: str) -> None:
    with pytest.raises(ReadRefused, match=r"a run spec may not read /(proc|sys|dev)"):
        ReadPolicy(data_roots=("/",)).check_local(path)


def test_data_roots_confine_local_reads(tmp_path: Path) -> None:
    (tmp_path / "datasets").mkdir()
    (tmp_path / "home").mkdir()
    os.symlink(tmp_path / "home", tmp_path / "datasets" / "escape")
    rules = ReadPolicy(cache_dir=str(tmp_path / "cache"), data_roots=(str(tmp_path / "datasets"),))
    assert rules.check_local(tmp_path / "datasets" / "train-0.tar")
    assert rules.check_local(tmp_path / "cache" / "demo-0.tar")  # the trainer's own demo shards
    for outside in (tmp_path / "home" / "notes.json", tmp_path / "datasets" / "escape" / "notes.json"):
        with pytest.raises(ReadRefused, match=r"outside this host's data_roots \(.*datasets\)"):
            rules.check_local(outside)
    assert ReadPolicy().check_local(tmp_path / "home" / "x")  # default: unconfined


def test_the_trainers_readers_apply_the_installed_policy(state: Path, tmp_path: Path, policy: None) -> None:
    make_shard(state / "planted-0.tar", [1])
    (state / "classes.json").write_text(json.dumps(["a", "b"]))
    (state / "tree" / "cat").mkdir(parents=True)
    read_policy.install(ReadPolicy(state_dir=str(state), cache_dir=str(state / "cache")))
    with pytest.raises(ConfigError, match=r"^data\.train: .*planted-0\.tar: a run spec may not read this"):
        data.resolve_shards(str(state / "planted-{0..1}.tar"), "data.train", str(state / "cache"))
    with pytest.raises(ConfigError, match=r"^data\.classes: cannot read the class list .*state directory"):
        data.load_classes(f"file://{state}/classes.json")
    with pytest.raises(ConfigError, match=r"^data\.train: .*tree: a run spec may not read this host's state"):
        folder_tree.list_tree(f"{state}/tree/", "data.train")
    tally = data.ShardTally()
    reader = data.ShardReader(tally=tally)  # carries the policy into loader workers
    read_policy.install(ReadPolicy())
    assert list(reader([{"url": str(state / "planted-0.tar")}])) == [] and tally.failed == 1


def test_a_tree_file_linking_out_of_the_roots_is_skipped(tmp_path: Path, policy: None) -> None:
    root = tmp_path / "data" / "tree"
    (root / "cat").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"not yours")
    os.symlink(tmp_path / "secret.png", root / "cat" / "a.png")
    index = tmp_path / "index.json.gz"
    folder_tree._write_index(index, folder_tree.TreeIndex(f"{root}/", ["cat"], [(0, "cat/a.png")]))
    read_policy.install(ReadPolicy(data_roots=(str(tmp_path / "data"),)))
    read = folder_tree._reader(f"{root}/", read_policy.current())
    with pytest.raises(ReadRefused, match="outside this host's data_roots"):
        read("cat/a.png")


# --- URLs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("address", "why"), [
    ("169.254.169.254", "link-local"), ("fe80::1%eth0", "link-local"), ("127.0.0.1", "loopback"),
    ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"), ("0.0.0.0", "unspecified (this host)"),
    ("fd00:ec2::254", "cloud metadata"), ("100.100.100.200", "cloud metadata"),
    ("10.1.2.3", None), ("192.168.0.7", None), ("8.8.8.8", None), ("2001:db8::1", None),
])
def test_refused_addresses(address: str, why: str | None) -> None:
    assert refused_address(address) == why


def test_the_metadata_service_is_refused_before_any_connection(policy: None) -> None:
    read_policy.install(ReadPolicy())
    with pytest.raises(ConfigError, match=r"169\.254\.169\.254 is 169\.254\.169\.254, a link-local address"):
        data.load_classes("http://169.254.169.254/computeMetadata/v1/instance/service-accounts/default/token")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """A loopback HTTP server of tmp_path, with /redirect pointing at /classes.json."""
    (tmp_path / "classes.json").write_text(json.dumps(["cat", "dog"]))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/classes.json")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_loopback_urls_need_the_hosts_permission(served: str, policy: None) -> None:
    read_policy.install(ReadPolicy())
    port = served.rsplit(":", 1)[1]
    for url in (f"http://{served}/classes.json", f"http://localhost:{port}/classes.json"):
        with pytest.raises(ConfigError, match=r"is (127\.0\.0\.1|::1), a loopback address: .*allow_local_urls"):
            data.load_classes(url)
    read_policy.install(ReadPolicy(allow_local_urls=True))
    assert data.load_classes(f"http://{served}/classes.json") == ["cat", "dog"]
    assert data.load_classes(f"http://{served}/redirect") == ["cat", "dog"]  # every connection is checked


# --- the host's settings reach the trainer ------------------------------------------------------

def test_data_roots_and_local_urls_come_from_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "hivemindd.toml"
    config.write_text('[host]\ndevice = "cpu"\ndata_roots = ["/srv/datasets", "~/data"]\nallow_local_urls = true\n')
    cfg = build_config({"config": str(config), "state_dir": str(tmp_path / "s")})
    assert cfg.data_roots == ("/srv/datasets", os.path.expanduser("~/data")) and cfg.allow_local_urls
    assert cfg.host_defaults.device == "cpu"
    assert build_config({"state_dir": str(tmp_path / "s")}).data_roots == ()  # default: unconfined
    config.write_text('[host]\ndata_roots = ["relative/path"]\n')
    with pytest.raises(DaemonConfigError, match=r"host\.data_roots: 'relative/path' is not an absolute path"):
        build_config({"config": str(config), "state_dir": str(tmp_path / "s")})


def _launch(tmp_path: Path, state: Path, classes: str) -> TrainerLaunch:
    spec = parse_toml(f'[model]\narch = "resnet18"\nnum_classes = 2\n[data]\ntrain = "demo://shapes/train"\n'
                      f'train_samples = 10\nclasses = "{classes}"\n')
    return TrainerLaunch(run_id="r", spec=spec, host=HostSettings(device="cpu"), work_dir=str(state / "runs" / "r"),
                         cache_dir=str(state / "cache"), initial_peers=(), state_dir=str(state),
                         data_roots=(str(tmp_path / "datasets"),), allow_local_urls=True)


def test_the_launch_carries_the_policy(tmp_path: Path, state: Path) -> None:
    launch = TrainerLaunch.from_json(_launch(tmp_path, state, "/x.json").to_json())
    assert read_policy.for_launch(launch) == ReadPolicy(state_dir=str(state), cache_dir=str(state / "cache"),
                                                        data_roots=(str(tmp_path / "datasets"),),
                                                        allow_local_urls=True)


def test_a_trainer_refuses_a_class_list_linked_into_its_state_dir(tmp_path: Path, state: Path) -> None:
    """The whole path: the daemon's launch → the trainer installs the policy → the spec's class list is refused."""
    (tmp_path / "datasets").mkdir()
    os.symlink(state / "identity.key", tmp_path / "datasets" / "classes.json")
    launch_file = tmp_path / "launch.json"
    launch_file.write_text(_launch(tmp_path, state, str(tmp_path / "datasets" / "classes.json")).to_json())
    done = subprocess.run([sys.executable, "-m", "hivemindd.trainer", "--launch", str(launch_file)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "data.classes: cannot read the class list" in done.stdout and "state directory" in done.stdout
    assert "secret key" not in done.stdout + done.stderr


def test_pretrained_weights_are_read_under_the_policy(state: Path, policy: None) -> None:
    from hivemindd.trainer.model import build_model, load_pretrained

    (state / "runs" / "other").mkdir(parents=True)
    (state / "runs" / "other" / "best.pt").write_bytes(b"another run's weights")
    read_policy.install(ReadPolicy(state_dir=str(state), cache_dir=str(state / "cache")))
    with pytest.raises(ConfigError, match=r"^model\.pretrained: .*best\.pt: a run spec may not read this host's state"):
        load_pretrained(build_model("resnet18", 2, 32), str(state / "runs" / "other" / "best.pt"), "resnet18", 2)
