"""What one catalog run does to one track, without Ray or Prefect (tests call it directly).

:class:`RunSpec` is the whole description of a run's output (model, weights, settings, encoding,
stems); its :meth:`RunSpec.settings_hash` decides whether a committed track can be skipped.
:func:`process_track` separates one track into a folder of its own,
``OUT/stems/<track_id>/<settings_hash>/<attempt>/``, and returns its manifest rows: a bad track becomes a
failure row, it never raises.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
import uuid
from dataclasses import dataclass, field

from demix.models.base import Separator
from demix.models.registry import load_model
from demix.pipeline.batch.catalog import Track
from demix.pipeline.batch.manifest import FailureRow, StemRow, TrackRow
from demix.pipeline.engine import Detector, SeparationSettings, TrackError, plan_stems, separate_track
from demix.pipeline.io import Encoding, filesystem, join


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a run's stems (nothing secret: no credentials, no endpoints).

    ``registry_module`` names a module to import before the model is looked up, in every process
    that loads it (the planner and each Ray actor): a module that registers extra entries with
    :func:`demix.models.registry.register` (tests, plug-in models). It must be importable on every Ray
    worker (installed, or on their ``PYTHONPATH``). It is not part of :meth:`settings_hash`: the
    model's name, options and weights digest already are.
    """

    out: str
    model: str
    weights: str | None = None
    weights_sha256: str | None = None
    trust_weights: bool = False
    model_options: tuple[tuple[str, object], ...] = ()
    settings: SeparationSettings = field(default_factory=SeparationSettings)
    encoding: Encoding = field(default_factory=Encoding)
    stems: tuple[str, ...] | None = None
    two_stems: str | None = None
    registry_module: str | None = None
    presence: str = "combined"

    def load_presence(self, separator: Separator) -> Detector:
        """The :class:`demix.pipeline.engine.Detector` of this run (``presence`` is one of its kinds)."""
        return Detector(self.presence, sources=separator.sources)

    def import_registry(self) -> None:
        """Import ``registry_module`` (if any), so its entries are registered in this process."""
        if self.registry_module:
            importlib.import_module(self.registry_module)

    def load(self, device: str | None = None) -> Separator:
        self.import_registry()
        return load_model(
            self.model, weights=self.weights, sha256=self.weights_sha256, trust=self.trust_weights,
            device=device or self.settings.device, **dict(self.model_options),
        )

    def settings_hash(self, model_sha256: str | None, presence_sha256: str | None = None, model=None) -> str:
        """Hash of what changes the stems and their manifest rows: model, weights digest, options,
        settings (the overlap as used for ``model``), encoding, stems, and the presence detector (with
        the classifier's digest)."""
        payload = {
            "model": self.model,
            "weights_sha256": model_sha256,
            "options": sorted((k, repr(v)) for k, v in self.model_options),
            "settings": self.settings.hash_fields(model),
            "encoding": self.encoding.hash_fields(),
            "stems": self.stems,
            "two_stems": self.two_stems,
            "presence": [self.presence, presence_sha256],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def new_attempt() -> str:
    """A fresh name for one try of a track: ``<UTC time>-<random>``, sortable by when it started."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:10]}"


def stem_uri(out: str, track_id: str, settings_hash: str, attempt: str, stem: str, extension: str) -> str:
    """``OUT/stems/<track_id>/<settings_hash>/<attempt>/<stem>.<ext>``: written once, never overwritten
    (a rerun with ``--force`` or other settings writes another folder; ``demix gc`` removes old ones)."""
    return join(out, "stems", track_id, settings_hash, attempt, f"{stem}.{extension}")


def _source_bytes(uri: str) -> int | None:
    try:
        fs, path = filesystem(uri)
        return int(fs.size(path))
    except Exception:  # noqa: BLE001 - size is informative; the read stage reports real errors
        return None


def process_track(
    model: Separator, track: Track, spec: RunSpec, *, settings_hash: str, detector=None, stage=None
) -> tuple[TrackRow, list[StemRow], list[FailureRow]]:
    """Separate ``track`` into a new folder ``spec.out/stems/<track_id>/<settings_hash>/<attempt>/``;
    return its manifest rows.

    With a ``detector`` (:meth:`RunSpec.load_presence`) the stem rows carry ``present``,
    ``presence_score`` and ``active_segments``. ``stage``: a shared model stage (see
    :func:`~demix.pipeline.engine.separate_track`); ``model`` may then be its
    :class:`~demix.pipeline.batch.model_actors.ModelInfo`.

    Never raises for a bad track: the failure becomes a ``FailureRow`` naming the stage.
    """
    started = time.perf_counter()
    plan = plan_stems(model.sources, stems=spec.stems, two_stems=spec.two_stems)
    attempt = new_attempt()
    outputs = {s: stem_uri(spec.out, track.track_id, settings_hash, attempt, s, spec.encoding.extension) for s in plan.names}
    row = TrackRow(
        track_id=track.track_id, source_uri=track.uri, source_bytes=_source_bytes(track.uri), duration_s=None,
        sample_rate=None, channels=None, status="ok", model=spec.model,
        model_sha256=getattr(model, "weights_sha256", None), settings_hash=settings_hash, elapsed_s=0.0,
    )
    try:
        result = separate_track(
            model, track.uri, outputs, plan=plan, encoding=spec.encoding, settings=spec.settings, presence=detector,
            stage=stage,
        )
    except TrackError as err:
        row.status = "failed"
        row.elapsed_s = time.perf_counter() - started
        message = str(err.cause)[:2000]
        return row, [], [FailureRow(track.track_id, track.uri, err.stage, err.error_type, message)]
    row.duration_s = result.duration_s
    row.sample_rate = result.source_sample_rate
    row.channels = result.source_channels
    row.elapsed_s = time.perf_counter() - started
    stems = [
        StemRow(
            track_id=track.track_id, stem=stem, uri=uri, format=spec.encoding.format,
            sample_rate=model.sample_rate, channels=model.audio_channels, num_frames=result.num_frames,
            duration_s=result.duration_s, rms_dbfs=result.rms_dbfs[stem],
            **_presence_columns(result.presence.get(stem)),
        )
        for stem, uri in result.stems.items()
    ]
    return row, stems, []


def _presence_columns(verdict) -> dict:
    if verdict is None:
        return {}
    return {"present": verdict.present, "presence_score": verdict.score, "active_segments": verdict.segment_dicts()}
