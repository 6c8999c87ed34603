"""The files of a training run's folder, written atomically, and the export of its best weights.

``state.pt`` (model, optimizer, step, RNG state) is saved and resumed here; ``best.safetensors`` and
``best.json`` hold the weights with the best validation SDR and their sha256; :func:`export_checkpoint`
turns them into a shippable ``<model>-<sha8>.safetensors`` through :func:`demix.models.weights.save`,
the one writer of checksum-named weights.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from demix.models.weights import load_strict, save, sha256_file, verify
from demix.pipeline.io import AtomicOutput, atomic_write

STATE_FORMAT = 1


def write_json(path: Path, data: dict) -> None:
    """``data`` as indented, key-sorted JSON at ``path``, atomically."""
    atomic_write(str(path), (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def _save_safetensors(path: Path, state: dict[str, Tensor]) -> str:
    """Write ``state`` (moved to CPU, contiguous) as safetensors atomically; return its sha256."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with AtomicOutput() as staged:
        save_file(tensors, staged.path_for(str(path)))
        staged.commit()
    return sha256_file(path)


def save_state(
    path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, best: dict,
    loss_acc: list, cuda_devices: list[int],
) -> None:
    """Write ``state.pt``: model, optimizer, ``step``, the torch (and CUDA) RNG state, ``best`` and the
    running train-loss sum ``loss_acc``."""
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(cuda_devices[0]) if cuda_devices else None}
    state = {"format": STATE_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "rng": rng, "best": best, "loss_acc": loss_acc}
    with AtomicOutput() as staged:
        torch.save(state, staged.path_for(str(path)))
        staged.commit()


def load_state(
    path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, cuda_devices: list[int],
) -> tuple[int, dict, list]:
    """Resume from ``state.pt`` at ``path``: load the model, optimizer and RNG state, drop the
    ``log.jsonl`` records past its step; return ``(step, best, loss_acc)``.

    Raises:
        ValueError: another state format, or a run already past ``steps``.
    """
    out = path.parent
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} has format {state.get('format')!r}; this demix reads {STATE_FORMAT}")
    step = int(state["step"])
    if step > steps:
        raise ValueError(f"{out} is already trained to step {step}, past steps={steps}")
    load_strict(model, state["model"], where=str(path))
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if cuda_devices and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], cuda_devices[0])
    best, loss_acc = dict(state["best"]), list(state["loss_acc"])
    _truncate_log(out / "log.jsonl", step)
    return step, best, loss_acc


def _truncate_log(path: Path, step: int) -> None:
    """Drop records past ``step`` (written after the last checkpoint of an interrupted run)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("step", 0) <= step:
                kept.append(line + "\n")
    atomic_write(str(path), "".join(kept).encode("utf-8"))


def save_best(out: Path, weights: dict[str, Tensor], info: dict) -> None:
    """Write ``out/best.safetensors`` and ``out/best.json`` (``info`` plus the weights' sha256)."""
    digest = _save_safetensors(out / "best.safetensors", weights)
    write_json(out / "best.json", {**info, "sha256": digest})


def export_checkpoint(state_dir: str | Path, dest: str | Path, *, half: bool = False) -> tuple[Path, str]:
    """Write ``<dest>/<model>-<sha8>.safetensors`` and a ``.json`` next to it from ``state_dir/best.*``.

    Args:
        state_dir: a :func:`demix.pipeline.learn.train.train` output folder.
        dest: folder for the exported files (created).
        half: store floating-point tensors as float16 (half the size; they load into the float32
            model, losing precision beyond float16's).

    Returns:
        ``(path, sha256)`` of the exported weights; the name carries the first 8 hex digits, which
        :func:`demix.models.registry.load_model` checks.
    """
    state_dir, dest = Path(state_dir), Path(dest)
    weights, meta_path = state_dir / "best.safetensors", state_dir / "best.json"
    if not weights.is_file() or not meta_path.is_file():
        raise ValueError(f"{state_dir} holds no best.safetensors and best.json; train first")
    meta = json.loads(meta_path.read_text())
    verify(weights, sha256=meta.get("sha256"))
    path, digest = save(load_file(str(weights)), dest, meta["model"], half=half)
    info = {**meta, "sha256": digest, "dtype": "float16" if half else "float32", "trained_sha256": meta.get("sha256"),
            "size_bytes": path.stat().st_size}
    write_json(path.with_suffix(".json"), info)
    return path, digest
