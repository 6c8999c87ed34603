"""Multitrack datasets in the MUSDB18-HQ folder layout.

Layout (MUSDB18-HQ, and what :mod:`demix.pipeline.data.synth` writes)::

    ROOT/<track name>/{mixture,vocals,drums,bass,other}.wav     one folder per track
    ROOT/truth.json                                             optional: {track: {stem: present}}

MUSDB18-HQ itself ships ``train/`` and ``test/`` folders of that shape: pass ``subset="train"`` or
``"test"`` with the top folder, or give the subset folder as ``root``. Track names are folder names
as they are (MUSDB18-HQ's have spaces, apostrophes and ampersands). ``.flac`` files are read too.

Two readers: :class:`MusdbDataset` (checked once, slices on demand, for training) and
:func:`find_tracks` / :func:`load_track` (whole ``.wav`` tracks, for evaluation).
Audio is ``(channels, time)`` float32; every file is read through :func:`demix.pipeline.io.read_slice`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from demix.pipeline.io import AudioError, audio_info, read_slice
from demix.pipeline.stems import MIXTURE, STEMS

AUDIO_EXTENSIONS = (".wav", ".flac")
"""Extensions looked for, in order, for every ``<stem>`` file of a track."""


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
                info = audio_info(str(path))
            except (AudioError, OSError) as err:  # OSError: StorageError and file system errors
                errors.append(f"cannot read {path.name}: {type(err).__name__}: {err}")
                continue
            if info.frames is None:
                errors.append(f"cannot read {path.name}: its decoder reports no length")
                continue
            files[key], infos[key] = path, info
        if errors:
            raise ValueError(f"track {name!r}: {'; '.join(errors)}")
        ref = infos[MIXTURE]
        for key, info in infos.items():
            if info.sample_rate != ref.sample_rate:
                errors.append(f"{files[key].name} is at {info.sample_rate} Hz, the mixture at {ref.sample_rate} Hz")
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
            name=name, path=folder, sample_rate=int(ref.sample_rate), frames=int(ref.frames), stems=self.stems,
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
        # read_slice rounds seconds * rate back to frames: exact for integer frames / rate far beyond any track
        start_s, duration_s = start / track.sample_rate, frames / track.sample_rate
        for key in keys:
            try:
                data, _ = read_slice(str(track.files[key]), start_s, duration_s)
            except (AudioError, OSError) as err:  # OSError: StorageError and file system errors
                raise ValueError(f"track {track.name!r}: cannot read {track.files[key].name}: {err}") from err
            out[key] = data
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


# --------------------------------------------------------------------------------------------------
# Whole tracks (evaluation)
# --------------------------------------------------------------------------------------------------


def find_tracks(dataset: str | Path) -> list[Path]:
    """Track folders (those holding ``mixture.wav``) directly inside ``dataset``, sorted by name.

    Raises:
        FileNotFoundError: ``dataset`` is not a folder.
        ValueError: no track folder; names MUSDB18-HQ's ``train``/``test`` when that is the cause.
    """
    root = Path(dataset)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist")
    tracks = sorted(p for p in root.iterdir() if p.is_dir() and (p / "mixture.wav").is_file())
    if not tracks:
        splits = [p.name for p in sorted(root.iterdir()) if p.is_dir() and any(p.glob("*/mixture.wav"))]
        hint = f"; it holds the splits {splits}: pass one of them, e.g. {str(root / splits[0])!r}" if splits else ""
        raise ValueError(f"no track folders (<track>/mixture.wav) in {str(root)!r}{hint}")
    return tracks


def _read(path: Path) -> tuple[np.ndarray, int]:
    if not path.is_file():
        raise FileNotFoundError(f"missing {str(path)!r}")
    data, rate = read_slice(str(path))
    return data, int(rate)


def load_track(folder: str | Path, stems: Sequence[str] = STEMS) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """``(mixture, {stem: reference}, sample_rate)`` of a MUSDB-layout track folder, ``(channels, time)``.

    Raises:
        FileNotFoundError: a missing file; ValueError: files of different rates or shapes.
    """
    folder = Path(folder)
    mixture, rate = _read(folder / "mixture.wav")
    refs = {}
    for stem in stems:
        x, r = _read(folder / f"{stem}.wav")
        if r != rate or x.shape != mixture.shape:
            raise ValueError(
                f"{folder.name}/{stem}.wav: Expected {mixture.shape} at {rate} Hz like mixture.wav. Found: {x.shape} at {r} Hz"
            )
        refs[stem] = x
    return mixture, refs, rate
