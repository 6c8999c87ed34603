"""Training loop for the project's own models, resumable, with validation SDR and verified checkpoints.

:func:`train` fits any trainable registered model (the spectrogram U-Net first of all) on a dataset
folder in the MUSDB18-HQ layout (:mod:`demix.pipeline.data.musdb`), on CUDA when present and on CPU otherwise.
Its output folder holds::

    config.json     the TrainConfig; a second run in the same folder must match it (it resumes)
    state.pt        model, optimizer, step, RNG state; written atomically every checkpoint_every steps
    log.jsonl       one JSON record per logged step: train_loss, and valid_loss / valid_sdr when validated
    best.safetensors, best.json     the weights with the best mean validation SDR so far, with their sha256

Training example ``k`` is a pure function of ``(seed, k)`` (:class:`~demix.pipeline.data.sampler.TrainingSampler`)
and the torch RNG state is checkpointed, so an interrupted run that resumes reaches the weights of an
uninterrupted one (bitwise on CPU with the same thread count).

:func:`demix.pipeline.learn.checkpoints.export_checkpoint` turns ``best.safetensors`` into a shippable
``<model>-<sha8>.safetensors`` (optionally float16) that :func:`demix.models.registry.load_model` verifies by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from demix.models import get_entry, load_model
from demix.pipeline.data import AugmentConfig, MusdbDataset, TrainingSampler, fixed_excerpts
from demix.pipeline.data.weak import MixedSampler, WeakDataset
from demix.pipeline.learn.checkpoints import load_state, save_best, save_state, write_json
from demix.pipeline.learn.masked import masked_loss
from demix.pipeline.learn.validation import LOSSES, loss_fn, mean_sdr, validate

RESUMABLE_FIELDS = frozenset({"steps", "device", "num_workers", "num_threads", "checkpoint_every", "valid_every", "log_every"})
"""Config fields a resumed run may change: they do not change what the model learns."""


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
            Loaded without requiring a checksum (a ``-<sha8>`` in its name is still checked).
        weak_dataset: folder of weak examples (``demix remix --labelled``); each training example is one
            of them with probability ``weak_share`` (:class:`~demix.pipeline.data.weak.MixedSampler`) and the
            loss is :func:`~demix.pipeline.learn.masked.masked_loss`. Validation stays on labelled data.
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
    weak_dataset: str | None = None
    weak_share: float = 0.5

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
            (0.0 <= self.weak_share <= 1.0, "0 <= weak_share <= 1", self.weak_share),
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


# ------------------------------------------------------------------------------------------ config


def _normalised(config: TrainConfig) -> dict:
    """``config.to_dict()`` with dataset paths made absolute (what is stored and compared)."""
    data = config.to_dict()
    if data["weak_dataset"] is None:  # runs without weak data compare as they did before the option existed
        del data["weak_dataset"], data["weak_share"]
    for key in ("dataset", "valid_dataset", "weak_dataset"):
        if data.get(key) is not None:
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


class _Examples(torch.utils.data.Dataset):
    """Map-style view of a sampler (example ``k`` -> ``sampler.example(k)``) so that a DataLoader with
    any number of workers yields examples in index order and a run can start at any index."""

    def __init__(self, sampler: TrainingSampler) -> None:
        self.sampler = sampler

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        return self.sampler.example(index)


# ------------------------------------------------------------------------------------------- train


@dataclass
class _Run:
    """A training run's pieces and its progress (``step``, ``best``, ``loss_acc``: what ``state.pt`` keeps)."""

    config: TrainConfig
    out: Path
    device: torch.device
    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    sampler: TrainingSampler | MixedSampler
    excerpts: list[tuple[str, Tensor, Tensor]]
    meta: dict
    cuda_devices: list[int]
    log: Callable[[dict], None] | None
    step: int = 0
    best: dict = field(default_factory=lambda: {"sdr": None, "step": None})
    loss_acc: list = field(default_factory=lambda: [0.0, 0])


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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    given = _normalised(config)
    config_path, state_path = out / "config.json", out / "state.pt"
    if config_path.is_file():
        _check_same_run(json.loads(config_path.read_text()), given, out)
    elif state_path.is_file():
        raise ValueError(f"{out} holds state.pt without config.json; refusing to resume an unknown run")

    run = _build(config, out, device, log)
    threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        if config.num_threads is not None:  # for this run only; the caller's setting comes back after
            torch.set_num_threads(config.num_threads)
            stack.callback(torch.set_num_threads, threads)
        stack.enter_context(torch.random.fork_rng(devices=run.cuda_devices))
        if state_path.is_file():
            run.step, run.best, run.loss_acc = load_state(
                state_path, model=run.model, optimizer=run.optimizer, steps=config.steps, cuda_devices=run.cuda_devices
            )
        else:
            torch.manual_seed(config.seed)
            if device.type == "cuda":
                torch.cuda.manual_seed(config.seed)
        write_json(config_path, given)
        _loop(run, progress)
    if not (out / "best.safetensors").is_file():  # resumed a run that had already finished, before best existed
        raise ValueError(f"{out} has no best.safetensors; the run never validated")
    return out / "best.safetensors"


def _build(config: TrainConfig, out: Path, device: torch.device, log: Callable[[dict], None] | None) -> _Run:
    """The model (from scratch or ``init_weights``), the training sampler, the validation excerpts and
    the optimizer of a run."""
    entry = get_entry(config.model)
    # from scratch, or from init_weights (fine-tuning): the user's own artefacts, loaded as with --trust-weights
    model = load_model(
        config.model, device=device, pretrained=False, weights=config.init_weights, trust=True, **config.model_options
    )
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
    if config.weak_dataset is not None:
        sampler = MixedSampler(sampler, WeakDataset(config.weak_dataset), share=config.weak_share, seed=config.seed)
    excerpts = fixed_excerpts(
        valid_set, valid_idx, seconds=config.valid_seconds or config.excerpt_seconds, target_rate=model.sample_rate,
        sources=model.sources,
    )
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)

    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    meta = {"model": entry.name, "options": dict(config.model_options), "sources": list(model.sources),
            "sample_rate": int(model.sample_rate)}
    return _Run(config, out, device, model, params, optimizer, sampler, excerpts, meta, cuda_devices, log)


def _loop(run: _Run, progress: bool) -> None:
    """Train from ``run.step`` to ``config.steps``: log, validate and checkpoint on their schedules."""
    config = run.config
    loader = torch.utils.data.DataLoader(
        _Examples(run.sampler), batch_size=config.batch_size,
        sampler=range(run.step * config.batch_size, config.steps * config.batch_size),
        num_workers=config.num_workers, pin_memory=run.device.type == "cuda", drop_last=False,
        generator=torch.Generator().manual_seed(config.seed),  # else the loader draws from the global RNG
    )
    bar = _progress_bar(progress, run.step, config.steps)
    started, first_step = time.perf_counter(), run.step
    try:
        for batch in loader:
            loss = _train_step(run, batch)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.4f}")
            last = run.step == config.steps
            validating = run.step % config.valid_every == 0 or last
            if validating or run.step % config.log_every == 0:
                elapsed = time.perf_counter() - started
                _record(run, validating, elapsed, (run.step - first_step) / elapsed if elapsed > 0 else None)
            if run.step % config.checkpoint_every == 0 or last:
                save_state(run.out / "state.pt", model=run.model, optimizer=run.optimizer, step=run.step, best=run.best,
                           loss_acc=run.loss_acc, cuda_devices=run.cuda_devices)
    finally:
        if bar is not None:
            bar.close()


def _train_step(run: _Run, batch: list[Tensor]) -> Tensor:
    """One optimizer step on a batch ``(mixture, stems)``, or with weak data ``(mixture, stems, known,
    rest_mask, rest)`` (:func:`masked_loss`); returns its loss."""
    mixture, stems, *masks = (t.to(run.device, non_blocking=True) for t in batch)
    run.optimizer.zero_grad(set_to_none=True)
    estimate = run.model(mixture)
    loss = masked_loss(run.config.loss, estimate, stems, *masks) if masks else loss_fn(run.config.loss, estimate, stems)
    if not torch.isfinite(loss):
        raise ValueError(f"training diverged at step {run.step + 1}: loss is {float(loss)}; lower lr")
    loss.backward()
    if run.config.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(run.params, run.config.grad_clip)
    run.optimizer.step()
    run.step += 1
    run.loss_acc[0] += float(loss.detach())
    run.loss_acc[1] += 1
    return loss.detach()


def _record(run: _Run, validating: bool, elapsed: float, steps_per_s: float | None) -> None:
    """Emit a log record (mean train loss since the last one); on validation steps validate, and save
    ``best.*`` when the mean SDR improved."""
    record = {"step": run.step, "train_loss": run.loss_acc[0] / max(run.loss_acc[1], 1), "elapsed_s": elapsed,
              "steps_per_s": steps_per_s}
    run.loss_acc = [0.0, 0]
    if validating:
        config = run.config
        valid_loss, sdrs = validate(run.model, run.excerpts, loss=config.loss, batch_size=config.batch_size,
                                    device=run.device)
        mean = mean_sdr(sdrs)
        best = run.best
        improved = best["step"] is None or (mean is not None and (best["sdr"] is None or mean > best["sdr"]))
        if improved:
            save_best(run.out, run.model.weights_module().state_dict(),
                      {**run.meta, "step": run.step, "valid_sdr": sdrs, "valid_sdr_mean": mean})
            run.best = {"sdr": mean, "step": run.step}
        record.update(valid_loss=valid_loss, valid_sdr=sdrs, valid_sdr_mean=mean, best=improved)
    with open(run.out / "log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    if run.log is not None:
        run.log(record)


def _progress_bar(enabled: bool, step: int, steps: int):
    if not enabled:
        return None
    return tqdm(total=steps, initial=step, unit="step", desc="train", dynamic_ncols=True)


def read_log(out_dir: str | Path) -> Iterator[dict]:
    """The records of ``out_dir/log.jsonl``, in order."""
    with open(Path(out_dir) / "log.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
