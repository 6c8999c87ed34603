"""What a catalog run has to do, decided from the catalog and the committed manifests alone (no
Prefect, no Ray): the flow's plan task, the CLI's ``--dry-run``, and the no-op rerun that returns the
committed summary without starting Prefect or Ray."""

from __future__ import annotations

from dataclasses import dataclass

from demix.pipeline.batch import manifest, report
from demix.pipeline.batch.catalog import Track, read_catalog
from demix.pipeline.batch.run import RunSpec
from demix.pipeline.engine import SeparationSettings
from demix.pipeline.io import Encoding


def run_spec(
    out: str, model: str = "unet", *, weights: str | None = None, weights_sha256: str | None = None,
    trust_weights: bool = False, model_options: dict | None = None, settings: dict | None = None, encoding: dict | None = None,
    stems: list[str] | None = None, two_stems: str | None = None, registry_module: str | None = None,
    presence: str = "combined",
) -> RunSpec:
    """The :class:`RunSpec` of the catalog flow's parameters (``out`` already an output root); the
    planner resolves the model on the CPU, each actor moves it to its own device."""
    return RunSpec(
        out=out, model=model, weights=weights, weights_sha256=weights_sha256, trust_weights=trust_weights,
        model_options=tuple(sorted((model_options or {}).items())),
        settings=SeparationSettings(**{**(settings or {}), "device": "cpu"}), encoding=Encoding(**(encoding or {})),
        stems=tuple(stems) if stems else None, two_stems=two_stems, registry_module=registry_module,
        presence=presence,
    )


@dataclass(frozen=True)
class Pending:
    """The catalog's tracks, those still to do (not committed ok with this settings hash, or all with
    ``force``), how many of them are committed ok with this settings hash (``force`` or not), and the
    hashes that decide it."""

    tracks: list[Track]
    pending: list[Track]
    settings_hash: str
    model_sha256: str | None
    committed: int = 0
    weights_verified_by: str | None = None

    @property
    def skipped(self) -> int:
        return len(self.tracks) - len(self.pending)


def pending_tracks(catalog: str, spec: RunSpec, force: bool = False) -> Pending:
    """Read the catalog and drop the tracks already committed ok with the same settings hash (the
    model is loaded on the CPU once, first, so refused weights fail before the catalog is read: its
    weights digest is part of the hash)."""
    model = spec.load(device="cpu")
    digest = getattr(model, "weights_sha256", None)
    settings_hash = spec.settings_hash(digest, spec.load_presence(model).weights_sha256, model)
    tracks = read_catalog(catalog)
    done = manifest.committed_ok(spec.out, settings_hash)
    pending = list(tracks) if force else [t for t in tracks if t.track_id not in done]
    committed = sum(t.track_id in done for t in tracks)
    return Pending(tracks, pending, settings_hash, digest, committed, getattr(model, "weights_verified_by", None))


def committed_summary(out: str, total: int, skipped: int, stats: dict | None = None) -> dict:
    """The catalog summary of what is committed under ``out`` (consolidated manifests rewritten), with
    this run's counters ``stats`` (none: nothing was run)."""
    tables = manifest.read_manifests(out)
    paths = manifest.write_consolidated(out, tables)
    stats = stats or {"ok": 0, "failed": 0, "audio_s": 0.0, "wall_s": 0.0}
    return report.catalog_summary(tables, paths, total, skipped, stats)
