"""Training loop for the project's own models, resumable, with validation SDR and verified checkpoints.

:func:`train` fits any trainable registered model (the spectrogram U-Net first of all) on a dataset
folder in the MUSDB18-HQ layout (:mod:`demix.pipeline.data.datasets`), on CUDA when present and on CPU otherwise.
Its output folder holds::

    config.json     the TrainConfig; a second run in the same folder must match it (it resumes)
    state.pt        model, optimizer, step, RNG state; written atomically every checkpoint_every steps
    log.jsonl       one JSON record per logged step: train_loss, and valid_loss / valid_sdr when validated
    best.safetensors, best.json     the weights with the best mean validation SDR so far, with their sha256

Training example ``k`` is a pure function of ``(seed, k)`` (:class:`~demix.pipeline.data.datasets.TrainingSampler`)
and the torch RNG state is checkpointed, so an interrupted run that resumes reaches the weights of an
uninterrupted one (bitwise on CPU with the same thread count).

:func:`export_checkpoint` turns ``best.safetensors`` into a shippable ``<model>-<sha8>.safetensors``
(optionally float16) that :func:`demix.models.registry.load_model` verifies by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from demix.pipeline.data.datasets import AugmentConfig, MusdbDataset, TrainingSampler, fixed_excerpts, is_silent

LOSSES = ("l1", "mse")
STATE_FORMAT = 1

RESUMABLE_FIELDS = frozenset({"steps", "device", "num_workers", "num_threads", "checkpoint_every", "valid_every", "log_every"})
"""Config fields a resumed run may change: they do not change what the model learns."""

_SDR_EPS = 1e-10


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """What to train, on what, and how.

    Attributes:
        dataset: folder of track folders (MUSDB18-HQ layout; for MUSDB18-HQ itself its ``train/``).
        model: registered model name; it must have trainable parameters.
        model_options: options for :func:`demix.models.registry.load_model` (``depth``, ``channels``, ...).
        valid_dataset: validation folder; ``None`` holds out ``valid_share`` of ``dataset``'s tracks.
        valid_share: share of tracks held out when ``valid_dataset`` is ``None``.
        valid_seconds: length of each validation excerpt (middle of each track); ``None`` uses
            ``excerpt_seconds``.
        steps: optimizer steps in total (a resumed run goes on to this many).
        batch_size: examples per step.
        lr, weight_decay: Adam settings.
        excerpt_seconds: training example length; it overrides ``augment.excerpt_seconds``.
        loss: ``"l1"`` or ``"mse"`` on the waveforms of every stem.
        valid_every: validate every this many steps, and at the end.
        checkpoint_every: write ``state.pt`` every this many steps, and at the end.
        log_every: write a ``train_loss`` record (mean since the last record) every this many steps.
        seed: seeds the training examples, the validation split and dropout.
        device: ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        num_workers: DataLoader worker processes producing examples (0: in the training process).
        num_threads: ``torch.set_num_threads`` for this process when set; left alone otherwise.
        grad_clip: max gradient norm, ``None`` for no clipping.
        augment: training augmentation.
        init_weights: weights file (path or URI) to start from (fine-tuning); ``None`` trains from scratch.
    """

    dataset: str
    model: str = "unet"
    model_options: dict = field(default_factory=dict)
    valid_dataset: str | None = None
    valid_share: float = 0.1
    valid_seconds: float | None = None
    steps: int = 10000
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.0
    excerpt_seconds: float = 6.0
    loss: str = "l1"
    valid_every: int = 500
    checkpoint_every: int = 250
    log_every: int = 50
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    num_threads: int | None = None
    grad_clip: float | None = 5.0
    augment: AugmentConfig = AugmentConfig()
    init_weights: str | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, "steps >= 1", self.steps),
            (self.batch_size >= 1, "batch_size >= 1", self.batch_size),
            (self.lr > 0, "lr > 0", self.lr),
            (self.weight_decay >= 0, "weight_decay >= 0", self.weight_decay),
            (self.excerpt_seconds > 0, "excerpt_seconds > 0", self.excerpt_seconds),
            (self.loss in LOSSES, f"loss in {LOSSES}", self.loss),
            (self.valid_every >= 1, "valid_every >= 1", self.valid_every),
            (self.checkpoint_every >= 1, "checkpoint_every >= 1", self.checkpoint_every),
            (self.log_every >= 1, "log_every >= 1", self.log_every),
            (self.seed >= 0, "seed >= 0", self.seed),
            (self.num_workers >= 0, "num_workers >= 0", self.num_workers),
            (self.num_threads is None or self.num_threads >= 1, "num_threads >= 1 or None", self.num_threads),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip > 0 or None", self.grad_clip),
            (self.valid_seconds is None or self.valid_seconds > 0, "valid_seconds > 0 or None", self.valid_seconds),
            (self.valid_dataset is not None or 0 < self.valid_share < 1, "0 < valid_share < 1", self.valid_share),
            (isinstance(self.model_options, dict), "model_options to be a dict", self.model_options),
        ]
        for ok, expected, found in checks:
            if not ok:
                raise ValueError(f"Expected {expected}. Found: {found!r}")
        if isinstance(self.augment, dict):
            object.__setattr__(self, "augment", AugmentConfig(**self.augment))
        default = AugmentConfig().excerpt_seconds
        if self.augment.excerpt_seconds not in (default, self.excerpt_seconds):
            raise ValueError(
                f"augment.excerpt_seconds={self.augment.excerpt_seconds} differs from excerpt_seconds="
                f"{self.excerpt_seconds}; set the example length with TrainConfig.excerpt_seconds"
            )
        object.__setattr__(self, "augment", dataclasses.replace(self.augment, excerpt_seconds=self.excerpt_seconds))

    def to_dict(self) -> dict:
        """JSON-ready dict (what ``config.json`` holds)."""
        data = dataclasses.asdict(self)
        data["augment"]["gain_db"] = list(data["augment"]["gain_db"])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {', '.join(unknown)}")
        data = dict(data)
        if isinstance(data.get("augment"), dict):
            aug = dict(data["augment"])
            if "gain_db" in aug:
                aug["gain_db"] = tuple(aug["gain_db"])
            data["augment"] = AugmentConfig(**aug)
        return cls(**data)


# ------------------------------------------------------------------------------------------ files


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp name next to ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: dict) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def _save_safetensors(path: Path, state: dict[str, Tensor]) -> str:
    """Write ``state`` (moved to CPU, contiguous) as safetensors atomically; return its sha256."""
    from safetensors.torch import save_file

    from demix.models.weights import sha256_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    return sha256_file(path)


def _normalised(config: TrainConfig) -> dict:
    """``config.to_dict()`` with dataset paths made absolute (what is stored and compared)."""
    data = config.to_dict()
    for key in ("dataset", "valid_dataset"):
        if data[key] is not None:
            data[key] = str(Path(data[key]).expanduser().resolve())
    return json.loads(json.dumps(data))  # tuples -> lists, as read back from disk


def _check_same_run(stored: dict, given: dict, out_dir: Path) -> None:
    keys = sorted((set(stored) | set(given)) - RESUMABLE_FIELDS)
    diff = [f"{k}: {stored.get(k)!r} in {out_dir / 'config.json'}, {given.get(k)!r} now" for k in keys if stored.get(k) != given.get(k)]
    if diff:
        raise ValueError(
            f"{out_dir} holds a training run with another configuration; resume it with the same settings "
            f"(only {', '.join(sorted(RESUMABLE_FIELDS))} may change) or use a new folder. Differences:\n  "
            + "\n  ".join(diff)
        )


# ----------------------------------------------------------------------------------------- pieces


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when torch sees it, else CPU; a CUDA device that is absent is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


def loss_fn(name: str, estimate: Tensor, reference: Tensor) -> Tensor:
    """Mean L1 or squared error over every stem, channel and sample."""
    if name == "l1":
        return (estimate - reference).abs().mean()
    if name == "mse":
        return (estimate - reference).square().mean()
    raise ValueError(f"Expected loss in {LOSSES}. Found: {name!r}")


def sdr_db(reference: Tensor, estimate: Tensor) -> float:
    """``10 log10(|s|^2 / |s - ŝ|^2)`` in dB over all channels and samples of one stem."""
    ref = reference.double()
    err = (ref - estimate.double()).square().sum()
    return float(10.0 * torch.log10((ref.square().sum() + _SDR_EPS) / (err + _SDR_EPS)))


class _Examples(torch.utils.data.Dataset):
    """Map-style view of a sampler (example ``k`` -> ``sampler.example(k)``) so that a DataLoader with
    any number of workers yields examples in index order and a run can start at any index."""

    def __init__(self, sampler: TrainingSampler) -> None:
        self.sampler = sampler

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.sampler.example(index)


@torch.no_grad()
def validate(model: torch.nn.Module, excerpts: list[tuple[str, Tensor, Tensor]], *, loss: str, batch_size: int,
             device: torch.device) -> tuple[float, dict[str, float | None]]:
    """Mean loss and median per-stem SDR (silent references skipped; ``None`` when all are silent)."""
    was_training = model.training
    model.eval()
    try:
        losses, sdrs = [], {s: [] for s in model.sources}
        for i in range(0, len(excerpts), batch_size):
            part = excerpts[i : i + batch_size]
            mix = torch.stack([m for _, m, _ in part]).to(device)
            ref = torch.stack([s for _, _, s in part]).to(device)
            est = model(mix)
            losses.extend(float(loss_fn(loss, e, r)) for e, r in zip(est, ref))
            for e, r in zip(est.cpu(), ref.cpu()):
                for k, stem in enumerate(model.sources):
                    if not is_silent(r[k]):
                        sdrs[stem].append(sdr_db(r[k], e[k]))
    finally:
        model.train(was_training)
    return statistics.fmean(losses), {s: (statistics.median(v) if v else None) for s, v in sdrs.items()}


def _mean_sdr(sdrs: dict[str, float | None]) -> float | None:
    values = [v for v in sdrs.values() if v is not None]
    return statistics.fmean(values) if values else None


# ------------------------------------------------------------------------------------------- train


def train(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    log: Callable[[dict], None] | None = None,
    progress: bool = False,
) -> Path:
    """Train ``config.model`` on ``config.dataset``; resume when ``out_dir`` holds the same run.

    Args:
        config: the run (see :class:`TrainConfig`).
        out_dir: folder for ``config.json``, ``state.pt``, ``log.jsonl``, ``best.safetensors``/``.json``.
        log: called with every record also appended to ``log.jsonl``:
            ``{"step", "train_loss", "elapsed_s", "steps_per_s"}`` plus, on validation steps,
            ``"valid_loss"``, ``"valid_sdr"`` (``{stem: dB or None}``), ``"valid_sdr_mean"``, ``"best"``.
        progress: show a tqdm bar on stderr.

    Returns:
        The path of ``best.safetensors``.

    Raises:
        ValueError: bad settings or data, a model without trainable parameters, or ``out_dir``
            holding a run with another configuration (or one already past ``config.steps``).
        models.ModelLoadError: the model cannot be built.
    """
    from demix.models.registry import get_entry, load_model
    from demix.models.weights import load_strict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    given = _normalised(config)
    config_path, state_path = out / "config.json", out / "state.pt"
    if config_path.is_file():
        _check_same_run(json.loads(config_path.read_text()), given, out)
    elif state_path.is_file():
        raise ValueError(f"{out} holds state.pt without config.json; refusing to resume an unknown run")

    entry = get_entry(config.model)
    # from scratch, or from init_weights (fine-tuning)
    model = load_model(config.model, device=device, pretrained=False, weights=config.init_weights, **config.model_options)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"model {config.model!r} has no trainable parameters")

    dataset = MusdbDataset(config.dataset)
    if config.valid_dataset is not None:
        train_idx, valid_set = list(range(len(dataset))), MusdbDataset(config.valid_dataset)
        valid_idx = list(range(len(valid_set)))
    else:
        (train_idx, valid_idx), valid_set = dataset.split(config.valid_share, config.seed), dataset
    sampler = TrainingSampler(
        dataset, target_rate=model.sample_rate, augment=config.augment, seed=config.seed, sources=model.sources,
        indices=train_idx,
    )
    excerpts = fixed_excerpts(
        valid_set, valid_idx, seconds=config.valid_seconds or config.excerpt_seconds, target_rate=model.sample_rate,
        sources=model.sources,
    )
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)

    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        if config.num_threads is not None:  # for this run only; the caller's setting comes back after
            torch.set_num_threads(config.num_threads)
            stack.callback(torch.set_num_threads, threads)
        stack.enter_context(torch.random.fork_rng(devices=cuda_devices))
        step, best, loss_acc = 0, {"sdr": None, "step": None}, [0.0, 0]
        if state_path.is_file():
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            if state.get("format") != STATE_FORMAT:
                raise ValueError(f"{state_path} has format {state.get('format')!r}; this demix reads {STATE_FORMAT}")
            step = int(state["step"])
            if step > config.steps:
                raise ValueError(f"{out} is already trained to step {step}, past steps={config.steps}")
            load_strict(model, state["model"], where=str(state_path))
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"]["torch"])
            if cuda_devices and state["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(state["rng"]["cuda"], cuda_devices[0])
            best, loss_acc = dict(state["best"]), list(state["loss_acc"])
            _truncate_log(out / "log.jsonl", step)
        else:
            torch.manual_seed(config.seed)
            if device.type == "cuda":
                torch.cuda.manual_seed(config.seed)
        _write_json(config_path, given)

        meta = {"model": entry.name, "options": dict(config.model_options), "sources": list(model.sources),
                "sample_rate": int(model.sample_rate)}

        def save_state(at: int) -> None:
            rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(cuda_devices[0]) if cuda_devices else None}
            state = {"format": STATE_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": at,
                     "rng": rng, "best": best, "loss_acc": loss_acc}
            _atomic_write(state_path, lambda tmp: torch.save(state, tmp))

        def emit(record: dict) -> None:
            with open(out / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
            if log is not None:
                log(record)

        loader = torch.utils.data.DataLoader(
            _Examples(sampler), batch_size=config.batch_size,
            sampler=range(step * config.batch_size, config.steps * config.batch_size),
            num_workers=config.num_workers, pin_memory=device.type == "cuda", drop_last=False,
            generator=torch.Generator().manual_seed(config.seed),  # else the loader draws from the global RNG
        )
        bar = _progress_bar(progress, step, config.steps)
        started, first_step = time.perf_counter(), step
        try:
            for mixture, stems in loader:
                mixture = mixture.to(device, non_blocking=True)
                stems = stems.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(config.loss, model(mixture), stems)
                if not torch.isfinite(loss):
                    raise ValueError(f"training diverged at step {step + 1}: loss is {float(loss)}; lower lr")
                loss.backward()
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                step += 1
                loss_acc[0] += float(loss.detach())
                loss_acc[1] += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss):.4f}")
                last = step == config.steps
                validating = step % config.valid_every == 0 or last
                if validating or step % config.log_every == 0:
                    elapsed = time.perf_counter() - started
                    record = {"step": step, "train_loss": loss_acc[0] / max(loss_acc[1], 1), "elapsed_s": elapsed,
                              "steps_per_s": (step - first_step) / elapsed if elapsed > 0 else None}
                    loss_acc = [0.0, 0]
                    if validating:
                        valid_loss, sdrs = validate(model, excerpts, loss=config.loss, batch_size=config.batch_size,
                                                    device=device)
                        mean = _mean_sdr(sdrs)
                        improved = best["step"] is None or (mean is not None and (best["sdr"] is None or mean > best["sdr"]))
                        if improved:
                            digest = _save_safetensors(out / "best.safetensors", model.weights_module().state_dict())
                            _write_json(out / "best.json", {**meta, "step": step, "valid_sdr": sdrs,
                                                            "valid_sdr_mean": mean, "sha256": digest})
                            best = {"sdr": mean, "step": step}
                        record.update(valid_loss=valid_loss, valid_sdr=sdrs, valid_sdr_mean=mean, best=improved)
                    emit(record)
                if step % config.checkpoint_every == 0 or last:
                    save_state(step)
        finally:
            if bar is not None:
                bar.close()
    if not (out / "best.safetensors").is_file():  # resumed a run that had already finished, before best existed
        raise ValueError(f"{out} has no best.safetensors; the run never validated")
    return out / "best.safetensors"


def _truncate_log(path: Path, step: int) -> None:
    """Drop records past ``step`` (written after the last checkpoint of an interrupted run)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("step", 0) <= step:
                kept.append(line + "\n")
    _atomic_write(path, lambda tmp: tmp.write_text("".join(kept), encoding="utf-8"))


def _progress_bar(enabled: bool, step: int, steps: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=steps, initial=step, unit="step", desc="train", dynamic_ncols=True)


def read_log(out_dir: str | Path) -> Iterator[dict]:
    """The records of ``out_dir/log.jsonl``, in order."""
    with open(Path(out_dir) / "log.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


# ------------------------------------------------------------------------------------------ export


def export_checkpoint(state_dir: str | Path, dest: str | Path, *, half: bool = False) -> tuple[Path, str]:
    """Write ``<dest>/<model>-<sha8>.safetensors`` and a ``.json`` next to it from ``state_dir/best.*``.

    Args:
        state_dir: a :func:`train` output folder.
        dest: folder for the exported files (created).
        half: store floating-point tensors as float16 (half the size; they load into the float32
            model, losing precision beyond float16's).

    Returns:
        ``(path, sha256)`` of the exported weights; the name carries the first 8 hex digits, which
        :func:`demix.models.registry.load_model` checks.
    """
    from demix.models.weights import sha256_file, verify

    state_dir, dest = Path(state_dir), Path(dest)
    weights, meta_path = state_dir / "best.safetensors", state_dir / "best.json"
    if not weights.is_file() or not meta_path.is_file():
        raise ValueError(f"{state_dir} holds no best.safetensors and best.json; train first")
    meta = json.loads(meta_path.read_text())
    verify(weights, sha256=meta.get("sha256"))
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".export.{os.getpid()}.{uuid.uuid4().hex[:8]}.safetensors.part"
    try:
        save_file(state, str(tmp))
        digest = sha256_file(tmp)
        path = dest / f"{meta['model']}-{digest[:8]}.safetensors"
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    info = {**meta, "sha256": digest, "dtype": "float16" if half else "float32", "trained_sha256": meta.get("sha256"),
            "size_bytes": path.stat().st_size}
    _write_json(path.with_suffix(".json"), info)
    return path, digest


def fit_nmf(
    dataset: str | Path,
    dest: str | Path,
    *,
    components: int = 32,
    fit_iters: int = 200,
    max_tracks: int | None = None,
    seed: int = 0,
) -> tuple[Path, str]:
    """Learn the supervised-NMF baseline's dictionaries from a MUSDB-layout folder.

    Writes ``<dest>/nmf-<sha8>.safetensors`` (+ ``.json``) loadable with
    ``load_model("nmf", components=..., weights=path)``; returns ``(path, sha256)``.
    """
    import numpy as np

    from demix.models.registry import load_model
    from demix.models.weights import sha256_file
    from demix.pipeline.data.datasets import MusdbDataset

    data = MusdbDataset(dataset)
    model = load_model("nmf", components=components, pretrained=False)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data))[: max_tracks or len(data)]

    def examples():
        for i in order:
            tracks = data.load(int(i))
            stems = torch.stack([torch.from_numpy(tracks[s]) for s in model.sources])
            if data.tracks[int(i)].sample_rate != model.sample_rate:
                import torchaudio

                stems = torchaudio.functional.resample(stems, data.tracks[int(i)].sample_rate, model.sample_rate)
            yield stems

    model.fit(examples(), iters=fit_iters, seed=seed)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / "nmf.safetensors.part"
    digest = _save_safetensors(tmp, model.state_dict())
    final = dest / f"nmf-{digest[:8]}.safetensors"
    tmp.replace(final)
    _write_json(final.with_suffix(".json"), {
        "model": "nmf", "options": {"components": components}, "sources": list(model.sources),
        "sample_rate": model.sample_rate, "sha256": sha256_file(final), "tracks": len(order), "fit_iters": fit_iters,
    })
    return final, digest
