"""``GET /metrics``: the daemon's view in the Prometheus text format (prometheus-client).

Built fresh at every scrape from what the daemon already holds (status, the swarm
view, the last validation row), so there is no second bookkeeping to drift. Every
series carries the ``run_id`` label ("" while the host is in no run) and the
trainer state is a one-hot gauge, the usual way to export an enum.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from hivemindd.wire.states import TrainerState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class DaemonCollector(Collector):
    """Turns one snapshot (``Daemon.metrics_snapshot()``) into metric families."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        run = s.get("run_id") or ""
        labels = ["run_id"]
        trainer = s.get("trainer") or {}

        info = InfoMetricFamily("hivemindd", "This daemon: version, peer id, hostname.")
        info.add_metric([], {"version": s.get("version", ""), "peer_id": s.get("peer_id", ""),
                             "hostname": s.get("hostname", "")})
        yield info

        state = GaugeMetricFamily("hivemindd_trainer_state", "1 for the trainer's current state, 0 for the others.",
                                  labels=[*labels, "state"])
        for name in TrainerState:
            state.add_metric([run, name.value], 1.0 if trainer.get("state") == name else 0.0)
        yield state

        restarts = CounterMetricFamily("hivemindd_trainer_restarts", "Trainer restarts since the daemon started.",
                                       labels=labels)
        restarts.add_metric([run], float(trainer.get("restarts") or 0))
        yield restarts

        yield from _gauges(run, [
            ("hivemindd_paused", "1 while the owner has paused training.", 1.0 if s.get("paused") else 0.0),
            ("hivemindd_trainer_step", "This host's local optimizer steps in the run.", trainer.get("step")),
            ("hivemindd_hivemind_epoch", "The swarm's global optimizer step this host is at.", trainer.get("epoch")),
            ("hivemindd_samples_per_second", "This host's training throughput.", trainer.get("samples_per_s")),
            ("hivemindd_loss", "Mean training loss over the last progress interval.", trainer.get("loss")),
            ("hivemindd_learning_rate", "Learning rate in effect.", trainer.get("lr")),
            ("hivemindd_val_top1", "Top-1 accuracy (0..1) of the last validation.", s.get("val_top1")),
            ("hivemindd_val_top5", "Top-5 accuracy (0..1) of the last validation.", s.get("val_top5")),
            ("hivemindd_best_val_top1", "Best top-1 accuracy (0..1) of this host's validations.", s.get("best_val_top1")),
            ("hivemindd_checkpoint_step", "Step of the newest checkpoint.", trainer.get("checkpoint_step")),
            ("hivemindd_checkpoint_age_seconds", "Seconds since latest.pt was written.", s.get("checkpoint_age_s")),
            ("hivemindd_peers_known", "Fresh peers found through discovery.", s.get("peers")),
            ("hivemindd_dht_up", "1 while the host DHT node runs.", 1.0 if s.get("dht_alive") else 0.0),
            ("hivemindd_discovery_degraded", "1 while the discovery store is unreachable.",
             1.0 if s.get("discovery_state") == "degraded" else 0.0),
            ("hivemindd_shards_failed", "Training shards that could not be read and were skipped.",
             trainer.get("shards_failed")),
            ("hivemindd_swarm_peers", "Peers with a live progress record in the DHT.", s.get("swarm_peers")),
            ("hivemindd_swarm_samples_per_second", "Sum of the training peers' throughput.", s.get("swarm_samples_per_s")),
        ])

        errors = GaugeMetricFamily("hivemindd_discovery_failures",
                                   "Discovery rounds failed in a row (0 once the store answers again).", labels=labels)
        errors.add_metric([run], float(s.get("discovery_failures") or 0))
        yield errors


def _gauges(run: str, specs: list[tuple[str, str, Any]]) -> Iterator[Metric]:
    for name, doc, value in specs:
        gauge = GaugeMetricFamily(name, doc, labels=["run_id"])
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            gauge.add_metric([run], float(value))
        yield gauge  # a family without a sample: the value is unknown right now (no trainer, no validation yet)


def render(snapshot: dict[str, Any]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(snapshot))
    return generate_latest(registry)
