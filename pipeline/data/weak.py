"""Weakly supervised training examples (``demix remix --labelled``) and the mixed stream of labelled and weak ones.

A weak example folder (:mod:`demix.pipeline.batch.remix.weak`) holds ``mixture.wav``, ``<S>.wav`` (the one
known stem), ``rest.wav`` (the known sum of the other stems) and ``weak.json`` (``known``, ``rest_of``).
:class:`WeakDataset` reads a folder of them; :class:`MixedSampler` draws example ``k`` from the labelled
:class:`~demix.pipeline.data.sampler.TrainingSampler` or, with probability ``share``, from the weak set,
as a pure function of ``(seed, k)``. Every example it yields has the same five parts, so labelled and
weak examples share a batch (per-example masks)::

    mixture (2, T), stems (S, 2, T), known (S,) bool, rest_mask (S,) bool, rest (2, T)

A labelled example has every stem known and an empty ``rest_mask``; a weak one has ``known`` its one
stem (the others zero in ``stems``), ``rest_mask`` the stems ``rest`` is the sum of.
:func:`demix.pipeline.learn.masked.masked_loss` uses exactly that. Weak examples get per-part gain,
channel swap and sign flip (the mixture stays the exact sum of the two parts) but never the stem remix
across songs: their unknown stems cannot be taken apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from demix.pipeline.data.sampler import AugmentConfig, TrainingSampler
from demix.pipeline.io import audio_info, read_slice
from demix.pipeline.stems import MIXTURE

MARKER = "weak.json"


@dataclass(frozen=True)
class WeakExample:
    """One weak example folder: its known stem, the stems ``rest`` sums, its files, rate and length."""

    name: str
    known: str
    rest_of: tuple[str, ...]
    files: dict[str, Path]  # mixture, <known>, rest
    sample_rate: int
    frames: int


class WeakDataset:
    """The weak example folders (``<example>/weak.json``) directly inside ``root``.

    Raises:
        ValueError: no such folder, no example, or examples with missing or mismatched files (all named).
    """

    def __init__(self, root: str | Path) -> None:
        folder = Path(root).expanduser()
        if not folder.is_dir():
            raise ValueError(f"weak dataset folder not found: {folder}")
        examples, problems = [], []
        for marker in sorted(folder.glob(f"*/{MARKER}")):
            try:
                examples.append(self._inspect(marker))
            except (ValueError, OSError, KeyError, json.JSONDecodeError) as err:
                problems.append(f"{marker.parent.name}: {err}")
        if problems:
            raise ValueError(f"weak dataset {folder}: {len(problems)} broken examples:\n  " + "\n  ".join(problems))
        if not examples:
            raise ValueError(f"weak dataset {folder} holds no weak examples (<example>/{MARKER}); build them with `demix remix --labelled`")
        self.root = folder
        self.examples: list[WeakExample] = examples

    @staticmethod
    def _inspect(marker: Path) -> WeakExample:
        meta = json.loads(marker.read_text())
        known = meta["known"]
        if len(known) != 1:
            raise ValueError(f"{MARKER} must name one known stem. Found: {known}")
        rest = meta.get("rest", "rest")
        files = {key: marker.parent / f"{name}.wav" for key, name in ((MIXTURE, MIXTURE), (known[0], known[0]), ("rest", rest))}
        infos = {key: audio_info(str(path)) for key, path in files.items()}
        shapes = {(i.sample_rate, i.frames, i.channels) for i in infos.values()}
        if len(shapes) != 1:
            raise ValueError(f"mixture, {known[0]} and {rest} differ in rate, length or channels: {sorted(shapes)}")
        info = infos[MIXTURE]
        if info.channels not in (1, 2):
            raise ValueError(f"training needs mono or stereo audio, found {info.channels} channels")
        return WeakExample(marker.parent.name, known[0], tuple(meta["rest_of"]), files, int(info.sample_rate), int(info.frames))

    def __len__(self) -> int:
        return len(self.examples)


def _stereo(audio: np.ndarray) -> Tensor:
    wav = torch.from_numpy(np.ascontiguousarray(audio))
    return wav.repeat(2, 1) if wav.shape[0] == 1 else wav


class MixedSampler(torch.utils.data.Dataset):
    """Example ``k``: from ``weak`` with probability ``share`` (drawn from ``(seed, k)``), else
    ``labelled.example(k)``; each as the five parts of the module docstring, at ``labelled``'s rate,
    length and sources.

    Raises:
        ValueError: ``share`` outside ``[0, 1]``, or a weak example whose stems are not the model's sources.
    """

    def __init__(self, labelled: TrainingSampler, weak: WeakDataset, *, share: float, seed: int) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"Expected 0 <= weak share <= 1. Found: {share}")
        sources = labelled.sources
        for ex in weak.examples:
            if ex.known not in sources or set(ex.rest_of) != set(sources) - {ex.known}:
                raise ValueError(
                    f"weak example {ex.name!r}: known {ex.known!r} and rest_of {list(ex.rest_of)} must split the model's "
                    f"sources {list(sources)}"
                )
        self.labelled, self.weak, self.share, self.seed = labelled, weak, float(share), int(seed)
        self.sources: tuple[str, ...] = sources
        self.length = labelled.length
        self.target_rate = labelled.target_rate
        self.augment: AugmentConfig = labelled.augment

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self.example(index)

    def is_weak(self, index: int) -> bool:
        """Whether example ``index`` comes from the weak set."""
        return bool(np.random.default_rng([self.seed, int(index), 7]).random() < self.share)

    def example(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(mixture, stems, known, rest_mask, rest)`` of example ``index``."""
        n = len(self.sources)
        if not self.is_weak(index):
            mixture, stems = self.labelled.example(index)
            return mixture, stems, torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool), torch.zeros_like(mixture)
        return self._weak(index)

    def _weak(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        rng = np.random.default_rng([self.seed, int(index), 8])
        ex = self.weak.examples[int(rng.integers(len(self.weak)))]
        wanted = round(self.augment.excerpt_seconds * ex.sample_rate)
        start = int(rng.integers(0, max(ex.frames - wanted, 0) + 1))
        frames = min(wanted, ex.frames - start)
        parts = {}
        for key in (ex.known, "rest"):
            data, _ = read_slice(str(ex.files[key]), start / ex.sample_rate, frames / ex.sample_rate)
            parts[key] = self._augment(rng, self._fit(_stereo(data), ex.sample_rate))
        k = self.sources.index(ex.known)
        stems = torch.zeros(len(self.sources), 2, self.length)
        stems[k] = parts[ex.known]
        known = torch.zeros(len(self.sources), dtype=torch.bool)
        known[k] = True
        rest_mask = torch.tensor([s in ex.rest_of for s in self.sources])
        return parts[ex.known] + parts["rest"], stems, known, rest_mask, parts["rest"]

    def _fit(self, wav: Tensor, rate: int) -> Tensor:
        if rate != self.target_rate:
            import torchaudio.functional as AF  # lazy: heavy, and needed only when examples must be resampled

            wav = AF.resample(wav, rate, self.target_rate)
        wav = torch.nn.functional.pad(wav, (0, max(self.length - wav.shape[-1], 0)))
        return wav[:, : self.length].contiguous()

    def _augment(self, rng: np.random.Generator, wav: Tensor) -> Tensor:
        low, high = self.augment.gain_db
        gain_db = float(rng.uniform(low, high)) if high > low else low
        if gain_db != 0.0:
            wav = wav * (10.0 ** (gain_db / 20.0))
        if rng.random() < self.augment.channel_swap:
            wav = wav.flip(0)
        if rng.random() < self.augment.sign_flip:
            wav = -wav
        return wav

