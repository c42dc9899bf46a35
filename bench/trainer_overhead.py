"""What hivemind.Optimizer costs one peer: trainer samples/s vs. a plain PyTorch loop, on the CPU.

Both run as fresh processes with the same torch thread count, the same model, the
same data pipeline (demo shards → train_batches → uint8 → DeviceNormalizer) and the
same per-step batch. The trainer is the real one (``python -m hivemindd.trainer``:
its own DHT, no partner, metrics CSVs, no validation, no checkpoint during the
window); its rate is read from its training_metrics.csv. The plain loop steps
torch.optim.SGD after every batch. Steps before ``--warmup`` are not timed.

    .venv/bin/python bench/trainer_overhead.py [--arch resnet18] [--steps 150] [--batch 32]

Prints both rates, the ratio (goal >= 0.95) and the machine.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def plain_loop(arch: str, batch: int, image_size: int, steps: int, warmup: int, cache: str) -> list[float]:
    """Seconds of each timed step of a plain loop (run in this process; call it in a fresh interpreter)."""
    import torch
    import torch.nn.functional as F

    from hivemindd.trainer.data import resolve_shards, train_batches
    from hivemindd.trainer.model import build_model
    from hivemindd.trainer.transforms import DeviceNormalizer

    shards = resolve_shards("demo://shapes/train", "data.train", cache)
    batches = train_batches(shards, image_size, batch, 0)
    model = build_model(arch, 10, image_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    normalize = DeviceNormalizer(torch.device("cpu"))
    times: list[float] = []
    last = time.perf_counter()
    for step in range(warmup + steps):
        images, labels = next(batches)
        logits = model(normalize(images))
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        correct = logits.detach().argmax(dim=1).eq(labels).sum()
        torch.stack([loss.detach(), correct.float()]).tolist()  # the trainer's one sync a step
        now = time.perf_counter()
        if step >= warmup:
            times.append(now - last)
        last = now
    return times


def trainer_rate(arch: str, batch: int, image_size: int, steps: int, warmup: int, target: int, cache: str,
                 env: dict[str, str]) -> tuple[list[float], Path]:
    from hivemindd.wire.launch import HostSettings, TrainerLaunch
    from hivemindd.wire.spec import RunSpec

    work = Path(tempfile.mkdtemp(prefix="hmb-", dir="/tmp"))
    spec = RunSpec.from_dict({
        "model": {"arch": arch, "num_classes": 10},
        "data": {"train": "demo://shapes/train", "train_samples": 4000, "image_size": image_size},
        "optimizer": {"lr": 0.01, "target_batch_size": target},
        "averaging": {"matchmaking_time": 2.0, "averaging_timeout": 15.0},
        "checkpoint": {"every_steps": 1_000_000},
    })
    launch = TrainerLaunch(run_id=f"bench-{os.getpid()}", spec=spec, host=HostSettings("cpu", batch, 0),
                           work_dir=str(work / "run"), cache_dir=cache, initial_peers=())
    (work / "launch.json").write_text(launch.to_json())
    log = open(work / "trainer.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "hivemindd.trainer", "--launch", str(work / "launch.json")],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    csv_path = next((work / "run" / "stats").glob("*"), work) / "training_metrics.csv"
    deadline = time.monotonic() + 600
    rows: list[dict[str, str]] = []
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"trainer exited with {proc.returncode}; see {work / 'trainer.log'}")
            found = list((work / "run" / "stats").glob("*/training_metrics.csv"))
            if found:
                csv_path = found[0]
                with open(csv_path, newline="") as f:
                    rows = list(csv.DictReader(f))
                if len(rows) >= warmup + steps:
                    break
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    stamps = [float(row["timestamp"]) for row in rows[warmup - 1:warmup + steps]]
    return [b - a for a, b in itertools.pairwise(stamps)], work


def rates(times: list[float], batch: int) -> tuple[float, float]:
    """(samples/s over the whole window, samples/s of the median step): the median shrugs off bursts
    of load from other processes on a shared machine, the mean includes the global steps' own cost."""
    return batch * len(times) / sum(times), batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=150, help="timed steps")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--target", type=int, default=256, help="target_batch_size of the trainer's run")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                        help="torch threads for both (the trainer's own default leaves one core to hivemind)")
    parser.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_only:
        print(json.dumps(plain_loop(args.arch, args.batch, args.image_size, args.steps, args.warmup, args.cache)))
        return

    from hivemindd.trainer.demo_data import ensure_demo_shards

    cache = tempfile.mkdtemp(prefix="hmb-cache-", dir="/tmp")
    ensure_demo_shards(cache)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    common = ["--arch", args.arch, "--batch", str(args.batch), "--image-size", str(args.image_size),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--cache", cache]

    def plain_run() -> list[float]:
        out = subprocess.run([sys.executable, __file__, "--plain-only", *common], env=env, cwd=REPO, check=True,
                             capture_output=True, text=True)
        times: list[float] = json.loads(out.stdout.strip().splitlines()[-1])
        return times

    # plain, trainer, plain: load from elsewhere on the machine hits both sides alike
    plain_times = plain_run()
    trainer_times, work = trainer_rate(args.arch, args.batch, args.image_size, args.steps, args.warmup, args.target,
                                       cache, env)
    plain_times += plain_run()
    plain_mean, plain_median = rates(plain_times, args.batch)
    trainer_mean, trainer_median = rates(trainer_times, args.batch)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
          f"torch threads {args.threads}; {args.arch} {args.image_size}px, batch {args.batch}, "
          f"target_batch_size {args.target}, {args.steps} timed steps after {args.warmup}")
    print("                      whole window   median step   (samples/s)")
    print(f"plain PyTorch loop : {plain_mean:12.1f}  {plain_median:12.1f}")
    print(f"hivemindd trainer  : {trainer_mean:12.1f}  {trainer_median:12.1f}")
    print(f"ratio              : {trainer_mean / plain_mean:12.3f}  {trainer_median / plain_median:12.3f}"
          "   (goal >= 0.95)")
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
