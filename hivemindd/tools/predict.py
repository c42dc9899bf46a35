"""``python -m hivemindd.tools.predict``: classify images with a run's checkpoint; one JSON document on stdout.

Runs as a subprocess of hmctl (which must not import torch) and of the daemon
(``POST /v1/predict``, which must not train or infer in its own process). The model
is rebuilt from the run's spec (``<run dir>/spec.json``), the weights come from the
checkpoint payload the trainer writes (``model`` state dict), and images go through
the same deterministic transform as validation. Class names come from the spec's
``[data] classes`` list when it has one (the demo set, ``demo://shapes``, names its
own); an entry like ``"n01440764 tench, Tinca tinca"`` (or ``"n01440764: tench"``)
gives a synset and a human label.

Exit codes: 0 ok (every image answered or reported as unreadable), 2 unusable
input (no such checkpoint, spec or model mismatch): the message is on stderr.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Any

_SYNSET = re.compile(r"^(n\d{8})(?:\s*[:\t ]\s*(.+))?$")
CHECKPOINT_FILES = {"best": "best.pt", "latest": "latest.pt", "final": "final.pt"}
# PIL's default (89 MP, and only a warning below 179 MP) let a 13,000² PNG (169 MP) take the predict
# process to 1.65 GB peak RSS; a 40 MP JPEG (a large camera photo) leaves it at its ~1.2 GB baseline (torch).
MAX_IMAGE_PIXELS = 40_000_000


class PredictError(Exception):
    """A problem with the checkpoint, spec or class list; the message says which and how to fix it."""


def describe_class(name: str) -> dict[str, str | None]:
    """``{"name", "synset", "label"}`` for a class list entry."""
    match = _SYNSET.match(name.strip())
    if match is None:
        return {"name": name, "synset": None, "label": name}
    return {"name": name, "synset": match.group(1), "label": match.group(2)}


def resolve_checkpoint(choice: str, run_dir: Path) -> Path:
    """``best``/``latest``/``final`` in the run's checkpoint folder, or a path; best falls back to latest."""
    if choice not in CHECKPOINT_FILES:
        path = Path(choice).expanduser()
        if not path.is_file():
            raise PredictError(f"--checkpoint {choice}: no such file (use best, latest, final or a path to a .pt file)")
        return path
    folder = run_dir / "checkpoints"
    path = folder / CHECKPOINT_FILES[choice]
    if path.is_file():
        return path
    if choice == "best" and (folder / CHECKPOINT_FILES["latest"]).is_file():
        return folder / CHECKPOINT_FILES["latest"]  # no validation yet (or no val data): the newest weights
    raise PredictError(f"--checkpoint {choice}: {path} does not exist yet; the trainer writes checkpoints every "
                       "[checkpoint] every_steps steps (hmctl status shows the last one)")


def load_spec(run_dir: Path) -> Any:
    from hivemindd.wire.spec import SpecError, parse_json

    path = run_dir / "spec.json"
    try:
        return parse_json(path.read_bytes(), source=str(path))
    except OSError as exc:
        raise PredictError(f"cannot read the run spec {path}: {exc.strerror or exc}; is this host in the run?") from None
    except SpecError as exc:
        raise PredictError(str(exc)) from None


def read_policy_for(run_dir: Path) -> Any:
    """What the run's spec may make this process read: the policy the daemon gave the run's trainer (its
    launch.json), else the default one with the state directory above ``run_dir`` refused."""
    from hivemindd.trainer.read_policy import ReadPolicy, for_launch
    from hivemindd.wire.launch import TrainerLaunch
    from hivemindd.wire.spec import SpecError

    try:
        return for_launch(TrainerLaunch.from_json((run_dir / "launch.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError, SpecError):  # no trainer yet, or not ours to read
        state = run_dir.parent.parent if run_dir.parent.name == "runs" else None
        return ReadPolicy(state_dir=str(state) if state else "", cache_dir=str(state / "cache") if state else "")


def predict(images: list[Path], checkpoint: Path, spec: Any, top: int) -> dict[str, Any]:
    import torch
    from PIL import Image, UnidentifiedImageError

    from hivemindd.trainer.data import load_classes
    from hivemindd.trainer.demo_data import class_names as demo_class_names
    from hivemindd.trainer.errors import ConfigError
    from hivemindd.trainer.model import build_model
    from hivemindd.trainer.transforms import DeviceNormalizer, val_transform

    torch.set_num_threads(min(4, torch.get_num_threads()))
    try:
        model = build_model(spec.model.arch, spec.model.num_classes, spec.data.image_size)
        # The demo set names its own classes ("red disc" …); any other set names them in [data] classes.
        classes = load_classes(spec.data.classes) if spec.data.classes else demo_class_names(spec.data.train)
    except ConfigError as exc:
        raise PredictError(str(exc)) from None
    try:
        # weights_only: a checkpoint holds tensors, numbers and strings; a pickled object in a planted or
        # downloaded file must not run code in this process.
        payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(payload["model"])
    except pickle.UnpicklingError as exc:
        raise PredictError(f"checkpoint {checkpoint} holds more than weights (refused: {_first_line(exc)[:200]}); "
                           "only checkpoints of tensors, numbers and strings are loaded") from None
    except (OSError, RuntimeError, KeyError, TypeError, EOFError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise PredictError(f"checkpoint {checkpoint} does not fit {spec.model.arch} with {spec.model.num_classes} "
                           f"classes: {first}") from None
    model.eval()
    transform = val_transform(spec.data.image_size)
    normalize = DeviceNormalizer(torch.device("cpu"))
    k = min(top, spec.model.num_classes)
    results: list[dict[str, Any]] = []
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # PIL refuses twice this in open() (DecompressionBombError)
    for image_path in images:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked just below
                opened = Image.open(image_path)
            with opened as image:
                width, height = image.size  # from the header: nothing is decoded yet
                if width * height > MAX_IMAGE_PIXELS:
                    raise ValueError(f"{width}x{height} pixels is too large (at most {MAX_IMAGE_PIXELS:,} pixels)")
                tensor = transform(image).unsqueeze(0)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            results.append({"image": str(image_path), "error": f"not a readable image: {exc}"})
            continue
        with torch.no_grad():
            probabilities = torch.softmax(model(normalize(tensor)).float(), dim=1)[0]
        values, indices = probabilities.topk(k)
        top_classes = []
        for p, i in zip(values.tolist(), indices.tolist(), strict=True):
            entry: dict[str, Any] = {"index": i, "probability": round(p, 6)}
            if classes is not None and i < len(classes):
                entry.update(describe_class(classes[i]))
            top_classes.append(entry)
        results.append({"image": str(image_path), "top": top_classes})
    return {"checkpoint": str(checkpoint), "step": payload.get("step"), "epoch": payload.get("epoch"),
            "best_top1": payload.get("best_top1"), "arch": spec.model.arch, "results": results}


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hivemindd.tools.predict", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--run-dir", type=Path, required=True, help="<state-dir>/runs/<run_id>")
    parser.add_argument("--checkpoint", default="best", help="best, latest, final or a path. [best]")
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        if args.top < 1:
            raise PredictError(f"--top must be at least 1, got {args.top}")
        spec = load_spec(args.run_dir)
        checkpoint = resolve_checkpoint(args.checkpoint, args.run_dir)
        from hivemindd.trainer import read_policy

        read_policy.install(read_policy_for(args.run_dir))  # before the spec's class list is opened
        result = predict(args.images, checkpoint, spec, args.top)
    except PredictError as exc:
        print(f"predict: {exc}", file=sys.stderr)
        return 2
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.exit(main())
