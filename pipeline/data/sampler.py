"""Training examples from a :class:`~demix.pipeline.data.musdb.MusdbDataset`, with Demucs-style augmentation.

Shapes: audio is ``(channels, time)``; a training example is ``mixture: (2, time)`` and
``stems: (sources, 2, time)``; a batch adds a leading ``batch`` dimension.

:class:`TrainingSampler` draws examples as Demucs does (``demucs/augment.py``): random excerpts,
per-stem gain, stems remixed across tracks (``Remix``), channel swap (``FlipChannels``) and sign
flip (``FlipSign``), each stem on its own; the mixture is then the exact sum of the augmented
stems. Example ``k`` is a pure function of ``(seed, k)``, so a training run resumes mid-stream
and the stream does not depend on how many DataLoader workers produce it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from demix.pipeline.data.musdb import MusdbDataset
from demix.pipeline.stems import MIXTURE, QUIET_DBFS, STEMS, is_silent


@dataclass(frozen=True)
class AugmentConfig:
    """How :class:`TrainingSampler` draws and augments examples.

    Attributes:
        excerpt_seconds: length of each example.
        gain_db: ``(low, high)``; each stem is scaled by a gain drawn uniformly in dB; ``(0, 0)`` is off.
        remix_prob: probability that a stem comes from another random track, at its own random
            offset, instead of the example's base track (tracks where the stem is known absent are
            passed over when ``truth.json`` says so).
        channel_swap: probability of swapping left and right, per stem.
        sign_flip: probability of negating a stem.
        silent_excerpt_retries: an excerpt drawn from one track that is silent in every stem it
            provides is drawn again (new track and offset) up to this many times.
    """

    excerpt_seconds: float = 6.0
    gain_db: tuple[float, float] = (-6.0, 3.0)
    remix_prob: float = 0.5
    channel_swap: float = 0.5
    sign_flip: float = 0.5
    silent_excerpt_retries: int = 3

    def __post_init__(self) -> None:
        if not self.excerpt_seconds > 0:
            raise ValueError(f"Expected excerpt_seconds > 0. Found: {self.excerpt_seconds}")
        if len(self.gain_db) != 2 or not self.gain_db[0] <= self.gain_db[1]:
            raise ValueError(f"Expected gain_db = (low, high) with low <= high. Found: {self.gain_db}")
        object.__setattr__(self, "gain_db", (float(self.gain_db[0]), float(self.gain_db[1])))
        for name in ("remix_prob", "channel_swap", "sign_flip"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Expected 0 <= {name} <= 1. Found: {value}")
        if self.silent_excerpt_retries < 0:
            raise ValueError(f"Expected silent_excerpt_retries >= 0. Found: {self.silent_excerpt_retries}")

    @classmethod
    def none(cls, excerpt_seconds: float = 6.0) -> AugmentConfig:
        """Plain random excerpts: no gain, no remix, no swap, no flip (still retries silent excerpts)."""
        return cls(excerpt_seconds, (0.0, 0.0), 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class StemRecipe:
    """Where one stem of an example came from and what was done to it (lineage for remixes)."""

    stem: str
    track: str
    start: int  # first sample read, at the track's rate
    frames: int  # samples read (fewer than the excerpt when the track is shorter; the rest is zeros)
    gain_db: float
    channel_swap: bool
    sign_flip: bool


def _to_stereo(audio: np.ndarray, where: str) -> np.ndarray:
    if audio.shape[0] == 2:
        return audio
    if audio.shape[0] == 1:
        return np.concatenate([audio, audio])
    raise ValueError(f"{where}: training needs mono or stereo audio, found {audio.shape[0]} channels")


class TrainingSampler(torch.utils.data.IterableDataset):
    """Endless stream of augmented training examples ``(mixture (2, T), stems (S, 2, T))`` float32.

    Args:
        dataset: the tracks.
        target_rate: rate of the examples; tracks at other rates are resampled
            (``torchaudio.functional.resample``). ``T = round(excerpt_seconds * target_rate)``.
        augment: how examples are drawn (:class:`AugmentConfig`).
        seed: example ``k`` depends on ``(seed, k)`` only.
        sources: stems returned, in this order (the model's sources); a subset of
            ``dataset.stems``. The mixture always sums *every* dataset stem, so with all stems as
            sources ``mixture == stems.sum(0)`` exactly.
        indices: the track positions to draw from (for example the training part of
            :meth:`MusdbDataset.split`); default all tracks.
        epoch_size: examples per ``iter()``; ``None`` (default) makes the iterator endless.

    Iterating yields examples ``epoch * epoch_size + k`` for ``k = 0, 1, ...`` (see
    :meth:`set_epoch`); DataLoader worker ``w`` of ``W`` takes ``k = w, w + W, ...``. Tracks shorter
    than an excerpt are zero-padded at the end.
    """

    def __init__(
        self,
        dataset: MusdbDataset,
        *,
        target_rate: int,
        augment: AugmentConfig = AugmentConfig(),
        seed: int = 0,
        sources: Sequence[str] = STEMS,
        indices: Sequence[int] | None = None,
        epoch_size: int | None = None,
    ) -> None:
        super().__init__()
        if target_rate <= 0:
            raise ValueError(f"Expected target_rate > 0. Found: {target_rate}")
        sources = tuple(sources)
        unknown = [s for s in sources if s not in dataset.stems]
        if not sources or unknown or len(set(sources)) != len(sources):
            raise ValueError(f"sources {sources} must be unique names among the dataset's stems {dataset.stems}")
        if seed < 0:
            raise ValueError(f"Expected seed >= 0. Found: {seed}")
        if epoch_size is not None and epoch_size < 1:
            raise ValueError(f"Expected epoch_size >= 1 or None. Found: {epoch_size}")
        pool = list(range(len(dataset))) if indices is None else [dataset.index(i) for i in indices]
        if not pool:
            raise ValueError("no tracks to sample from")
        for i in pool:
            if dataset.tracks[i].channels not in (1, 2):
                raise ValueError(f"track {dataset.tracks[i].name!r}: training needs mono or stereo audio")
        self.dataset = dataset
        self.target_rate = int(target_rate)
        self.augment = augment
        self.seed = int(seed)
        self.sources = sources
        self.indices = tuple(pool)
        self.epoch_size = epoch_size
        self.epoch = 0
        self.length = round(augment.excerpt_seconds * self.target_rate)
        # sources first (so their sum is the mixture's leading terms), then the other stems
        self._order = sources + tuple(s for s in dataset.stems if s not in sources)
        # remix donors per stem: tracks not known to lack it
        self._donors = {
            stem: [i for i in pool if (dataset.tracks[i].present or {}).get(stem, True)] or list(pool)
            for stem in dataset.stems
        }

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` yield the examples of ``epoch`` (needs ``epoch_size``), like
        ``DistributedSampler.set_epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.epoch_size is None:
            raise TypeError("TrainingSampler without epoch_size is endless and has no length")
        return self.epoch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        base = self.epoch * (self.epoch_size or 0)
        k = worker
        while self.epoch_size is None or k < self.epoch_size:
            yield self.example(base + k)
            k += workers

    def example(self, index: int) -> tuple[Tensor, Tensor]:
        """Example number ``index``: ``(mixture (2, T), stems (S, 2, T))``."""
        return self._draw(index)[:2]

    def recipe(self, index: int) -> tuple[StemRecipe, ...]:
        """How example ``index`` was made, one :class:`StemRecipe` per dataset stem (dataset order)."""
        return self._draw(index)[2]

    # ------------------------------------------------------------------------------------- helpers

    def _excerpt(self, track: int, start: int, stems: Sequence[str]) -> tuple[dict[str, Tensor], int]:
        """``{stem: (2, T)}`` at the target rate from ``start`` of ``track``, and the frames read."""
        info = self.dataset.tracks[track]
        wanted = round(self.augment.excerpt_seconds * info.sample_rate)
        frames = min(wanted, info.frames - start)
        audio = self.dataset.load(track, start=start, frames=frames, keys=stems)
        out = {}
        for stem, data in audio.items():
            wav = torch.from_numpy(_to_stereo(data, f"track {info.name!r}"))
            if info.sample_rate != self.target_rate:
                import torchaudio.functional as AF  # lazy: heavy, and needed only when a track must be resampled

                wav = AF.resample(wav, info.sample_rate, self.target_rate)
            n = wav.shape[-1]
            if n < self.length:
                wav = torch.nn.functional.pad(wav, (0, self.length - n))
            out[stem] = wav[:, : self.length].contiguous()
        return out, frames

    def _random_start(self, rng: np.random.Generator, track: int) -> int:
        info = self.dataset.tracks[track]
        wanted = round(self.augment.excerpt_seconds * info.sample_rate)
        return int(rng.integers(0, max(info.frames - wanted, 0) + 1))

    def _group(
        self, rng: np.random.Generator, choices: Sequence[int], stems: Sequence[str]
    ) -> tuple[int, int, int, dict[str, Tensor]]:
        """Draw a track among ``choices`` and an offset; redraw while every stem is silent."""
        for attempt in range(self.augment.silent_excerpt_retries + 1):
            track = int(choices[rng.integers(len(choices))])
            start = self._random_start(rng, track)
            audio, frames = self._excerpt(track, start, stems)
            if not all(is_silent(a, QUIET_DBFS) for a in audio.values()):
                break
        return track, start, frames, audio

    def _draw(self, index: int) -> tuple[Tensor, Tensor, tuple[StemRecipe, ...]]:
        if index < 0:
            raise ValueError(f"Expected example index >= 0. Found: {index}")
        aug = self.augment
        rng = np.random.default_rng([self.seed, int(index)])
        stems = self.dataset.stems
        remix_draws = rng.random(len(stems))
        can_remix = len(self.indices) > 1
        remixed = [s for s, u in zip(stems, remix_draws) if can_remix and u < aug.remix_prob]
        kept = [s for s in stems if s not in remixed]
        audio: dict[str, Tensor] = {}
        where: dict[str, tuple[int, int, int]] = {}
        base = None
        if kept:
            base, start, frames, got = self._group(rng, self.indices, kept)
            audio.update(got)
            where.update({s: (base, start, frames) for s in kept})
        else:
            base = int(self.indices[rng.integers(len(self.indices))])
        for stem in remixed:
            donors = [i for i in self._donors[stem] if i != base] or [i for i in self.indices if i != base]
            track, start, frames, got = self._group(rng, donors, [stem])
            audio.update(got)
            where[stem] = (track, start, frames)
        low, high = aug.gain_db
        recipes = []
        for stem in stems:
            gain_db = float(rng.uniform(low, high)) if high > low else low
            swap = bool(rng.random() < aug.channel_swap)
            flip = bool(rng.random() < aug.sign_flip)
            wav = audio[stem]
            if gain_db != 0.0:
                wav = wav * (10.0 ** (gain_db / 20.0))
            if swap:
                wav = wav.flip(0)
            if flip:
                wav = -wav
            audio[stem] = wav
            track, start, frames = where[stem]
            recipes.append(StemRecipe(stem, self.dataset.tracks[track].name, start, frames, gain_db, swap, flip))
        stacked = torch.stack([audio[s] for s in self._order])
        mixture = stacked.sum(0)
        return mixture, stacked[: len(self.sources)].clone(), tuple(recipes)


def fixed_excerpts(
    dataset: MusdbDataset,
    indices: Sequence[int] | None,
    *,
    seconds: float,
    target_rate: int,
    sources: Sequence[str] = STEMS,
) -> list[tuple[str, Tensor, Tensor]]:
    """Deterministic validation excerpts: ``seconds`` from the middle of each track.

    Returns:
        ``[(track name, mixture (2, T), stems (S, 2, T))]`` at ``target_rate``, with
        ``T = round(seconds * target_rate)``; the mixture is the track's own mixture file; tracks
        shorter than ``seconds`` are zero-padded at the end.
    """
    if not seconds > 0:
        raise ValueError(f"Expected seconds > 0. Found: {seconds}")
    sources = tuple(sources)
    unknown = [s for s in sources if s not in dataset.stems]
    if unknown:
        raise ValueError(f"sources {unknown} are not stems of the dataset {dataset.stems}")
    length = round(seconds * target_rate)
    out = []
    for i in range(len(dataset)) if indices is None else indices:
        info = dataset.tracks[dataset.index(i)]
        wanted = round(seconds * info.sample_rate)
        start = max(info.frames - wanted, 0) // 2
        frames = min(wanted, info.frames)
        audio = dataset.load(info.name, start=start, frames=frames, keys=(MIXTURE, *sources))
        wavs = {}
        for key, data in audio.items():
            wav = torch.from_numpy(_to_stereo(data, f"track {info.name!r}"))
            if info.sample_rate != target_rate:
                import torchaudio.functional as AF  # lazy: heavy, and needed only when a track must be resampled

                wav = AF.resample(wav, info.sample_rate, target_rate)
            wav = torch.nn.functional.pad(wav, (0, max(length - wav.shape[-1], 0)))[:, :length]
            wavs[key] = wav.contiguous()
        out.append((info.name, wavs[MIXTURE], torch.stack([wavs[s] for s in sources])))
    return out
