"""Multitrack datasets in the MUSDB18-HQ folder layout, and a training sampler with Demucs-style augmentation.

Layout (MUSDB18-HQ, and what :mod:`demix.pipeline.data.synth` writes)::

    ROOT/<track name>/{mixture,vocals,drums,bass,other}.wav     one folder per track
    ROOT/truth.json                                             optional: {track: {stem: present}}

MUSDB18-HQ itself ships ``train/`` and ``test/`` folders of that shape: pass ``subset="train"`` or
``"test"`` with the top folder, or give the subset folder as ``root``. Track names are folder names
as they are (MUSDB18-HQ's have spaces, apostrophes and ampersands). ``.flac`` files are read too.

Shapes: audio is ``(channels, time)``; a training example is ``mixture: (2, time)`` and
``stems: (sources, 2, time)``; a batch adds a leading ``batch`` dimension.

:class:`TrainingSampler` draws examples as Demucs does (``demucs/augment.py``): random excerpts,
per-stem gain, stems remixed across tracks (``Remix``), channel swap (``FlipChannels``) and sign
flip (``FlipSign``), each stem on its own; the mixture is then the exact sum of the augmented
stems. Example ``k`` is a pure function of ``(seed, k)``, so a training run resumes mid-stream
and the stream does not depend on how many DataLoader workers produce it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch import Tensor

STEMS = ("vocals", "drums", "bass", "other")
MIXTURE = "mixture"
AUDIO_EXTENSIONS = (".wav", ".flac")
"""Extensions looked for, in order, for every ``<stem>`` file of a track."""

SILENCE_DB = -60.0
"""An excerpt whose mean power is below this (dB re full scale, i.e. RMS < 0.001) counts as silent."""


def is_silent(audio: Tensor | np.ndarray, threshold_db: float = SILENCE_DB) -> bool:
    """True when the mean power of ``audio`` (any shape) is below ``threshold_db`` dBFS, or it is empty."""
    data = audio.detach().cpu().numpy() if isinstance(audio, Tensor) else np.asarray(audio)
    if data.size == 0:
        return True
    return float(np.mean(np.square(data, dtype=np.float64))) < 10.0 ** (threshold_db / 10.0)


@dataclass(frozen=True)
class TrackInfo:
    """One track folder.

    Attributes:
        name: folder name (the track's name).
        path: the folder.
        sample_rate: rate of every file in the folder, in Hz.
        frames: length of every file, in samples per channel.
        stems: stem names the dataset reads (the mixture is always there as well).
        present: ``{stem: bool}`` from ``truth.json`` when it lists the track, else ``None``.
        channels: channels of every file (1 or 2 for training).
        files: ``{stem or "mixture": file}``.
    """

    name: str
    path: Path
    sample_rate: int
    frames: int
    stems: tuple[str, ...]
    present: dict[str, bool] | None
    channels: int = 2
    files: dict[str, Path] | None = None

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.frames / self.sample_rate


def _find_audio(folder: Path, key: str) -> Path | None:
    for ext in AUDIO_EXTENSIONS:
        path = folder / f"{key}{ext}"
        if path.is_file():
            return path
    return None


def _subdirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


class MusdbDataset:
    """Reader for a folder of multitrack songs in the MUSDB18-HQ layout.

    Args:
        root: folder holding the track folders, or MUSDB18-HQ's top folder (with ``train/`` and
            ``test/``) together with ``subset``.
        subset: sub-folder of ``root`` to read (``"train"`` or ``"test"`` for MUSDB18-HQ).
        stems: stems every track must have, besides ``mixture``.

    Every track folder is checked once, here: each stem file and the mixture must exist, be
    readable and share sample rate, channels and length. All problems are reported together in
    one ``ValueError`` naming each broken track.

    Attributes:
        root: the folder the tracks are in.
        stems: the stems read.
        tracks: one :class:`TrackInfo` per track, sorted by name.
    """

    def __init__(self, root: str | Path, *, subset: str | None = None, stems: Sequence[str] = STEMS) -> None:
        top = Path(root).expanduser()
        if not top.is_dir():
            raise ValueError(f"dataset folder not found: {top}")
        if isinstance(stems, str) or not stems or len(set(stems)) != len(stems):
            raise ValueError(f"Expected stems to be a non-empty sequence of unique names. Found: {stems!r}")
        if MIXTURE in stems:
            raise ValueError(f"{MIXTURE!r} is read with every track; do not list it in stems")
        folder = top
        if subset is not None:
            folder = top / subset
            if not folder.is_dir():
                found = ", ".join(p.name for p in _subdirs(top)[:10]) or "none"
                raise ValueError(f"dataset {top} has no subset folder {subset!r} (sub-folders: {found})")
        candidates = _subdirs(folder)
        if subset is None and candidates and all(_find_audio(p, MIXTURE) is None for p in candidates):
            splits = [p.name for p in candidates if p.name in ("train", "test")]
            if splits:
                raise ValueError(
                    f"{top} looks like MUSDB18-HQ's top folder (it holds {' and '.join(splits)}/): pass "
                    f"subset='train' or subset='test', or give {top / splits[0]} as the root"
                )
        if not candidates:
            raise ValueError(f"dataset folder {folder} holds no track folders")
        self.root = folder
        self.stems = tuple(stems)
        truth = self._read_truth(folder / "truth.json")
        tracks, problems = [], []
        for path in candidates:
            try:
                tracks.append(self._inspect(path, truth.get(path.name)))
            except ValueError as err:
                problems.append(str(err))
        if problems:
            listed = "\n  ".join(problems)
            raise ValueError(f"dataset {folder}: {len(problems)} of {len(candidates)} track folders are broken:\n  {listed}")
        self.tracks: list[TrackInfo] = tracks
        self._by_name = {t.name: i for i, t in enumerate(tracks)}

    def _read_truth(self, path: Path) -> dict[str, dict[str, bool]]:
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read {path}: {err}") from err
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ValueError(f"{path} must map track names to {{stem: bool}} objects")
        return data

    def _inspect(self, folder: Path, truth: dict[str, bool] | None) -> TrackInfo:
        name = folder.name
        files, infos, errors = {}, {}, []
        for key in (MIXTURE, *self.stems):
            path = _find_audio(folder, key)
            if path is None:
                errors.append(f"missing {key}{AUDIO_EXTENSIONS[0]}")
                continue
            try:
                info = sf.info(str(path))
            except Exception as err:  # noqa: BLE001 - soundfile raises several types; all mean unreadable
                errors.append(f"cannot read {path.name}: {type(err).__name__}: {err}")
                continue
            files[key], infos[key] = path, info
        if errors:
            raise ValueError(f"track {name!r}: {'; '.join(errors)}")
        ref = infos[MIXTURE]
        for key, info in infos.items():
            if info.samplerate != ref.samplerate:
                errors.append(f"{files[key].name} is at {info.samplerate} Hz, the mixture at {ref.samplerate} Hz")
            if info.frames != ref.frames:
                errors.append(f"{files[key].name} has {info.frames} frames, the mixture {ref.frames}")
            if info.channels != ref.channels:
                errors.append(f"{files[key].name} has {info.channels} channels, the mixture {ref.channels}")
        if ref.frames == 0:
            errors.append("the mixture is empty")
        if errors:
            raise ValueError(f"track {name!r}: {'; '.join(errors)}")
        present = None
        if truth is not None:
            present = {s: bool(truth[s]) for s in self.stems if s in truth}
        return TrackInfo(
            name=name, path=folder, sample_rate=int(ref.samplerate), frames=int(ref.frames), stems=self.stems,
            present=present, channels=int(ref.channels), files=files,
        )

    def __len__(self) -> int:
        return len(self.tracks)

    def __repr__(self) -> str:
        return f"MusdbDataset({str(self.root)!r}, tracks={len(self)}, stems={self.stems})"

    def index(self, i_or_name: int | str) -> int:
        """Position of a track given its position or its name; ``ValueError`` when there is none."""
        if isinstance(i_or_name, str):
            try:
                return self._by_name[i_or_name]
            except KeyError:
                raise ValueError(f"no track named {i_or_name!r} in {self.root}") from None
        i = int(i_or_name)
        if not -len(self) <= i < len(self):
            raise ValueError(f"track index {i} out of range for {len(self)} tracks")
        return i % len(self)

    def load(
        self,
        i_or_name: int | str,
        *,
        start: int = 0,
        frames: int | None = None,
        keys: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Read ``frames`` samples from ``start`` of a track's files (only that slice is read).

        Args:
            i_or_name: track position or name.
            start: first sample, ``0 <= start <= track.frames``.
            frames: samples to read, ``None`` for the rest of the track; ``start + frames`` must not
                pass the end.
            keys: which files, among the stems and ``"mixture"``; default all of them.

        Returns:
            ``{stem or "mixture": (channels, frames) float32}``.
        """
        track = self.tracks[self.index(i_or_name)]
        if not 0 <= start <= track.frames:
            raise ValueError(f"track {track.name!r}: start {start} outside 0..{track.frames}")
        if frames is None:
            frames = track.frames - start
        if frames < 0 or start + frames > track.frames:
            raise ValueError(f"track {track.name!r}: cannot read {frames} frames from {start}; it has {track.frames}")
        keys = (MIXTURE, *self.stems) if keys is None else tuple(keys)
        unknown = [k for k in keys if k not in track.files]
        if unknown:
            raise ValueError(f"unknown keys {unknown}; this dataset reads {(MIXTURE, *self.stems)}")
        out = {}
        for key in keys:
            try:
                data = sf.read(str(track.files[key]), start=start, frames=frames, dtype="float32", always_2d=True)[0]
            except Exception as err:  # noqa: BLE001
                raise ValueError(f"track {track.name!r}: cannot read {track.files[key].name}: {err}") from err
            out[key] = np.ascontiguousarray(data.T)
        return out

    def split(self, valid_share: float, seed: int) -> tuple[list[int], list[int]]:
        """Shuffle the track positions with ``seed`` and cut them into ``(train, valid)``, each sorted.

        ``valid`` has ``round(valid_share * len)`` tracks, at least one, and ``train`` keeps at least one.
        """
        if not 0.0 < valid_share < 1.0:
            raise ValueError(f"Expected 0 < valid_share < 1. Found: {valid_share}")
        n = len(self)
        n_valid = max(1, round(valid_share * n))
        if n_valid >= n:
            raise ValueError(
                f"cannot hold out {valid_share:.0%} of {n} tracks for validation and keep one for training; "
                "add tracks or pass a separate validation dataset"
            )
        order = np.random.default_rng(seed).permutation(n)
        return sorted(int(i) for i in order[n_valid:]), sorted(int(i) for i in order[:n_valid])


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
                import torchaudio.functional as AF

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
            if not all(is_silent(a) for a in audio.values()):
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
                import torchaudio.functional as AF

                wav = AF.resample(wav, info.sample_rate, target_rate)
            wav = torch.nn.functional.pad(wav, (0, max(length - wav.shape[-1], 0)))[:, :length]
            wavs[key] = wav.contiguous()
        out.append((info.name, wavs[MIXTURE], torch.stack([wavs[s] for s in sources])))
    return out

