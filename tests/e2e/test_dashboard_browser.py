"""The dashboard in real headless Chromium against two real daemons training one run together.

Chromium loads ``/?token=…`` from daemon A's loopback listener (which trades the token
for a cookie), polls the API for a few seconds of virtual time, and the page writes
a summary (polls, points per chart, swarm rows, errors caught by window.onerror) into
``#hm-test-status``, which ``--dump-dom`` returns. A screenshot goes to the test's
output folder (``test-artifacts/`` when HIVEMINDD_TEST_ARTIFACTS is set, else tmp_path).
The same two daemons also serve the Prometheus and swarm checks of a real two-peer run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemons import DaemonProcess, daemon_at
from tests.support.dirs import short_dir
from tests.support.repo import REPO, check_schema
from tests.support.specs import spec_toml
from tests.support.waiting import wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.timeout(300)


class Pair:
    """Daemon A (with the loopback listener) and daemon B, both joined to one run and training it."""

    def __init__(self, a: DaemonProcess, b: DaemonProcess) -> None:
        self.a, self.b = a, b

    def url(self) -> str:
        return str(self.a.status()["http"]["url"])

    def token(self) -> str:
        return (self.a.state_dir / "http.token").read_text().strip()


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with short_dir("hmdb") as root, daemon_at(root / "a", "--http", "127.0.0.1:0") as a, daemon_at(root / "b") as b:
        spec = root / "spec.toml"
        spec.write_text(spec_toml({"validation": {"every_steps": 8}}))
        joined = a.hmctl("join", "--run-id", "demo", "--spec", str(spec), "--batch-size", "16", "--device", "cpu")
        assert joined.returncode == 0, joined.stderr
        joined = b.hmctl("join", "--run-id", "demo", "--batch-size", "16", "--device", "cpu")
        assert joined.returncode == 0, joined.stderr
        yield Pair(a, b)


def both_training(p: Pair) -> dict[str, Any] | None:
    view: dict[str, Any] = p.a.call("swarm")
    doing = [peer["activity"] for peer in view["peers"]]
    # "training" comes with the trainer's state; its rate with its first progress report, a moment later.
    reporting = all((peer.get("samples_per_s") or 0) > 0 for peer in view["peers"])
    return view if doing == ["training", "training"] and reporting else None


def history_ready(p: Pair) -> dict[str, Any] | None:
    history: dict[str, Any] = p.a.call("history")
    ready = len(history["training"].get("step", [])) >= 5 and history["validation"].get("val_top1") \
        and history["system"].get("cpu_percent")
    return history if ready else None


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # keep the 303 of /?token= and its Set-Cookie (urllib raises it as an HTTPError)


def test_the_swarm_view_lists_both_training_peers(pair: Pair) -> None:
    view = wait_until(lambda: both_training(pair), 150, "both peers to train in A's swarm view")
    check_schema(view, "Swarm")
    ids = {pair.a.status()["peer_id"], pair.b.status()["peer_id"]}
    assert {peer["peer_id"] for peer in view["peers"]} == ids
    totals = view["totals"]
    assert totals["peers"] == 2 and totals["training"] == 2 and totals["samples_per_s"] > 0
    assert totals["last_milestone"] == 30 and totals["global_epoch"] is not None
    shown = wait_until(lambda: (r := pair.a.hmctl("status", "--swarm")).returncode == 0 and "2 of 2 peer(s) training"
                       in r.stdout and r, 60, "hmctl status --swarm to show both peers training")
    assert shown.stdout.count(" training ") >= 2, shown.stdout
    wait_until(lambda: " training " in pair.a.hmctl("peers").stdout, 60, "hmctl peers to mark B as training")


def test_the_dashboard_draws_a_real_run_in_chromium(pair: Pair, tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium)")
    wait_until(lambda: both_training(pair), 150, "both peers to train")
    wait_until(lambda: history_ready(pair), 150, "training, validation and system rows in A's history")
    out = Path(os.environ.get("HIVEMINDD_TEST_ARTIFACTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    profile = tmp_path / "profile"
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={profile}", "--virtual-time-budget=9000", "--window-size=1400,1900", "--hide-scrollbars"]
    login = f"{pair.url()}/?token={pair.token()}"
    dom = subprocess.run([*base, "--dump-dom", login], capture_output=True, text=True, timeout=90)
    found = re.search(r'<pre id="hm-test-status"[^>]*>(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stdout[-2000:] + dom.stderr[-2000:]
    page = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert page["errors"] == [] and page["polls"] >= 2, page
    for chart in ("loss", "acc", "lr", "sps", "cpu", "net"):
        assert page["points"][chart] > 0, (chart, page)
    assert page["swarm_rows"] == 2
    assert set(page["swarm_peers"]) == {pair.a.status()["peer_id"], pair.b.status()["peer_id"]}
    shot = out / "dashboard.png"
    subprocess.run([*base, f"--screenshot={shot}", login], capture_output=True, timeout=90)
    assert shot.stat().st_size > 10_000  # a real picture, kept for people to look at


def test_the_listener_wants_the_token_and_the_cookie_only_reads(pair: Pair) -> None:
    url = pair.url()
    status, body = get(url + "/")
    assert status == 401 and "?token=" in json.loads(body)["error"]["message"]
    status, _ = get(url + "/?token=wrong")
    assert status == 401
    assert get(url + "/", {"Cookie": f"hivemindd_token={pair.token()}"})[0] == 401  # the token is never a cookie
    with pytest.raises(urllib.error.HTTPError) as login:  # the 303 of /?token=, not followed
        urllib.request.build_opener(NoRedirect).open(url + "/?token=" + pair.token(), timeout=30)
    login.value.close()
    cookie = {"Cookie": login.value.headers["Set-Cookie"].split(";", 1)[0]}  # hivemindd_session=<random id>
    assert get(url + "/", cookie)[0] == 200
    assert get(url + "/static/uPlot.iife.min.js", cookie)[0] == 200
    request = urllib.request.Request(url + "/v1/pause", data=b"{}", method="POST", headers=cookie)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    refused.value.close()
    assert refused.value.code == 403  # a cookie another local page could ride on must not control the daemon
    assert pair.a.status()["paused"] is False


def test_metrics_on_the_listener_parse_as_prometheus(pair: Pair) -> None:
    wait_until(lambda: both_training(pair), 150, "both peers to train")
    status, body = get(pair.url() + "/metrics", {"Authorization": f"Bearer {pair.token()}"})
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    values = {(s.name, s.labels.get("state", "")): s.value for f in families.values() for s in f.samples}
    assert values[("hivemindd_trainer_state", "running")] == 1.0
    assert values[("hivemindd_dht_up", "")] == 1.0
    assert values[("hivemindd_trainer_step", "")] > 0 and values[("hivemindd_swarm_peers", "")] == 2
    assert all(s.labels.get("run_id") == "demo" for f in families.values() for s in f.samples if s.name != "hivemindd_info")
    assert get(pair.url() + "/metrics")[0] == 401


# --- the page alone, against canned answers (no daemons): what it draws for given metrics -------------------

STATIC = REPO / "hivemindd" / "api" / "dashboard" / "static"


def _system_rows(gpu: bool) -> dict[str, list[Any]]:
    """Two stretches of 5 s samples with a 10-minute pause between them."""
    times = [1_700_000_000 + 5 * i for i in range(20)] + [1_700_000_700 + 5 * i for i in range(20)]
    n = len(times)
    return {"timestamp": times, "cpu_percent": [50.0] * n, "mem_percent": [30.0] * n, "net_sent_mb": [1.0] * n,
            "net_recv_mb": [1.0] * n, "gpu_util_percent": [80.0] * n if gpu else [None] * n,
            "gpu_mem_used_gb": [3.5] * n if gpu else [None] * n}


def _canned_api(gpu: bool) -> dict[str, Any]:
    status = {"hostname": "h", "peer_id": "QmCanned", "version": "0.1.0", "run_id": "demo", "paused": False,
              "trainer": {"state": "running", "restarts": 0, "since_s": 60, "step": 40, "epoch": 2, "loss": 1.5}}
    swarm = {"run_id": "demo", "peers": [], "totals": {"peers": 0, "training": 0, "samples_per_s": 0.0,
                                                       "dataset_epochs": None, "best_val_top1": None}}
    history = {"run_id": "demo", "cursor": "1.1.1", "system": _system_rows(gpu),
               "training": {"step": [1, 2, 3], "timestamp": [1, 2, 3], "loss": [2.0, 1.9, 1.8], "lr": [0.1] * 3,
                            "train_top1": [0.1] * 3, "samples_per_s": [10.0] * 3},
               "validation": {}}
    return {"/v1/status": status, "/v1/swarm": swarm, "/v1/metrics/history": history,
            "/v1/logs": {"entries": [], "lines": [], "next": 0}}


def _serve_page(answers: dict[str, Any]) -> tuple[Any, str]:
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path in answers:
                body, kind = json.dumps(answers[path]).encode(), "application/json"
            elif path == "/" or path.startswith("/static/"):
                name = "index.html" if path == "/" else path.removeprefix("/static/")
                body = (STATIC / name).read_bytes()
                kind = {".js": "text/javascript", ".css": "text/css"}.get(Path(name).suffix, "text/html")
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def _page_status(url: str, tmp_path: Path) -> dict[str, Any]:
    assert CHROMIUM is not None
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=90)
    found = re.search(r'<pre id="hm-test-status"[^>]*>(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stdout[-2000:] + dom.stderr[-2000:]
    page: dict[str, Any] = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    page["gpu_note_hidden"] = bool(re.search(r'id="gpu-none"[^>]*\shidden', dom.stdout))
    return page


@pytest.mark.parametrize("gpu", [False, True], ids=["no-gpu", "gpu"])
def test_the_gpu_chart_says_no_gpu_and_time_charts_break_at_a_pause(gpu: bool, tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium)")
    server, url = _serve_page(_canned_api(gpu))
    try:
        page = _page_status(url, tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert page["errors"] == [] and page["polls"] >= 1, page
    assert page["gpu"] == ("drawn" if gpu else "none") and page["gpu_note_hidden"] is gpu, page
    # One break in every time chart, where the 10-minute pause is; none in the charts drawn by step.
    assert page["gaps"] == {"loss": 0, "acc": 0, "lr": 0, "sps": 0, "cpu": 1, "net": 1, "gpu": 1}, page
    assert page["points"]["cpu"] == 80 and page["points"]["gpu"] == (80 if gpu else 0)
