"""GET /metrics renders the daemon's view in the Prometheus text format that Prometheus's own parser reads."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from hivemindd.api.metrics_export import render


def samples(text: bytes) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels.get("state", "")): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def test_a_training_host_exports_every_number_labelled_by_run() -> None:
    snapshot = {
        "run_id": "imagenet", "version": "0.1.0", "peer_id": "QmX", "hostname": "h1", "paused": False, "peers": 3,
        "dht_alive": True, "discovery_state": "degraded", "discovery_failures": 2, "val_top1": 0.71, "val_top5": 0.9,
        "best_val_top1": 0.72, "checkpoint_age_s": 12.5, "swarm_peers": 4, "swarm_samples_per_s": 900.0,
        "trainer": {"state": "running", "restarts": 1, "step": 1234, "epoch": 56, "samples_per_s": 250.5,
                    "loss": 2.25, "lr": 0.1, "checkpoint_step": 1200, "shards_failed": 0},
    }
    got = samples(render(snapshot))
    assert got[("hivemindd_trainer_state", "running")] == 1.0 and got[("hivemindd_trainer_state", "paused")] == 0.0
    assert got[("hivemindd_trainer_restarts_total", "")] == 1.0
    expected = {"hivemindd_trainer_step": 1234, "hivemindd_hivemind_epoch": 56, "hivemindd_samples_per_second": 250.5,
                "hivemindd_loss": 2.25, "hivemindd_val_top1": 0.71, "hivemindd_val_top5": 0.9,
                "hivemindd_checkpoint_age_seconds": 12.5, "hivemindd_peers_known": 3, "hivemindd_dht_up": 1,
                "hivemindd_discovery_degraded": 1, "hivemindd_discovery_failures": 2, "hivemindd_swarm_peers": 4}
    for name, value in expected.items():
        assert got[(name, "")] == value, name
    labels = {s.labels.get("run_id") for f in text_string_to_metric_families(render(snapshot).decode())
              for s in f.samples if s.name != "hivemindd_info"}
    assert labels == {"imagenet"}


def test_unknown_numbers_are_left_out_not_zero() -> None:
    got = samples(render({"run_id": None, "trainer": {"state": "stopped", "restarts": 0}, "dht_alive": False}))
    assert ("hivemindd_loss", "") not in got and ("hivemindd_val_top1", "") not in got
    assert got[("hivemindd_dht_up", "")] == 0.0 and got[("hivemindd_trainer_state", "stopped")] == 1.0
