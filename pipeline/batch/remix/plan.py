"""Remix planning: the ``remixes`` schema, :class:`RemixConfig`, the run's stems as
:class:`StemSource`, the :class:`Recipe` of each example (:func:`plan_remixes`, deterministic ids), and
the committed view of a remix output root (:func:`consolidated`, :func:`committed_examples`,
:func:`truth_of`). See :mod:`demix.pipeline.batch.remix` for the design.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from demix.pipeline.batch import catalog
from demix.pipeline.batch.manifest import FAILURES_SCHEMA, Commit, FailureRow, commit_tables, read_committed, rows_table
from demix.pipeline.io import atomic_write, join
from demix.pipeline.stems import STEMS

STEM_LINEAGE = pa.struct(
    [
        ("stem", pa.string()),
        ("uri", pa.string()),
        ("role", pa.string()),  # recipient | donor | silent
        ("source_track_id", pa.string()),
        ("source_stem_uri", pa.string()),
        ("offset_s", pa.float64()),
        ("loop_s", pa.float64()),
        ("gain_db", pa.float64()),
        ("active_s", pa.float64()),  # seconds of the example where this stem sounds (per presence)
    ]
)

REMIXES_SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),
        ("index", pa.int64()),
        ("split", pa.string()),
        ("mixture_uri", pa.string()),
        ("target_stem", pa.string()),
        ("recipient_track_id", pa.string()),
        ("donor_track_id", pa.string()),
        ("recipient_tempo_bpm", pa.float64()),
        ("donor_tempo_bpm", pa.float64()),
        ("duration_s", pa.float64()),
        ("sample_rate", pa.int32()),
        ("seed", pa.int64()),
        ("plan_digest", pa.string()),
        ("run_uri", pa.string()),
        ("stems", pa.list_(STEM_LINEAGE)),
        ("attempt", pa.string()),
    ]
)


class RemixError(ValueError):
    """The run cannot be remixed (no presence columns, nothing absent, no donor)."""


@dataclass(frozen=True)
class RemixConfig:
    """What the builder makes.

    Attributes:
        examples: number of examples.
        seed: seeds every random choice.
        seconds: length of each example; ``None`` keeps the recipient's whole length.
        gain_db: range of the random gain of every stem, in dB.
        split: MUSDB-layout folder the examples go to (``train`` by default).
        donor_candidates: donors considered per example (the tempo-closest is used).
        min_donor_active_s: a donor's stem must be active at least this long in total.
        peak: largest absolute sample of a mixture; louder mixtures are scaled down, stems alike.
    """

    examples: int
    seed: int = 0
    seconds: float | None = None
    gain_db: tuple[float, float] = (-3.0, 3.0)
    split: str = "train"
    donor_candidates: int = 4
    min_donor_active_s: float = 2.0
    peak: float = 0.95

    def __post_init__(self) -> None:
        if self.examples < 1:
            raise ValueError(f"examples must be >= 1. Found: {self.examples}")
        if self.seconds is not None and not self.seconds > 0:
            raise ValueError(f"seconds must be > 0. Found: {self.seconds}")
        lo, hi = self.gain_db
        if lo > hi:
            raise ValueError(f"gain_db must be (low, high) with low <= high. Found: {self.gain_db}")
        if self.donor_candidates < 1:
            raise ValueError(f"donor_candidates must be >= 1. Found: {self.donor_candidates}")
        if not 0 < self.peak <= 1:
            raise ValueError(f"peak must be in (0, 1]. Found: {self.peak}")
        if not self.split or "/" in self.split:
            raise ValueError(f"split must be a plain folder name. Found: {self.split!r}")


@dataclass(frozen=True)
class StemSource:
    """One committed stem of the run."""

    track_id: str
    stem: str
    uri: str
    duration_s: float
    sample_rate: int
    present: bool
    segments: tuple[tuple[float, float], ...]

    @property
    def active_s(self) -> float:
        return sum(e - s for s, e in self.segments)

    @staticmethod
    def from_dict(data: dict) -> StemSource:
        """Inverse of ``asdict`` (segments come back from JSON as lists)."""
        return StemSource(**{**data, "segments": tuple(tuple(x) for x in data["segments"])})


@dataclass(frozen=True)
class Recipe:
    """Everything :func:`build_example` needs for one example (plain data, JSON-able)."""

    example_id: str
    index: int
    target_stem: str
    stems: tuple[str, ...]
    recipient: dict  # stem -> asdict(StemSource) for every stem of the recipient track
    donors: tuple[dict, ...]  # asdict(StemSource) of each candidate's target stem, in preference order
    donor_beats: tuple[str | None, ...]  # a rhythm stem URI per candidate for its tempo (drums), or None
    offset_s: float
    seconds: float
    gains_db: dict  # stem -> dB drawn at plan time
    seed: int
    plan_digest: str
    run_uri: str
    split: str
    peak: float
    out: str = ""
    kind: str = "strong"  # strong: every stem known | weak: the donor's stem and the recipient's original excerpt
    mixture_uri: str = ""  # weak: the recipient's source audio (the tracks manifest's source_uri)
    labelled: str = ""  # weak: the labelled dataset the donors come from

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> Recipe:
        data = json.loads(text)
        return Recipe(**{**data, "stems": tuple(data["stems"]), "donors": tuple(data["donors"]), "donor_beats": tuple(data["donor_beats"])})


def stem_sources(stems_table: pa.Table, tracks_table: pa.Table | None = None) -> dict[str, dict[str, StemSource]]:
    """``{track_id: {stem: StemSource}}`` from a run's consolidated manifests (ok tracks only).

    Raises:
        RemixError: when the run has no presence columns filled.
    """
    ok = None
    if tracks_table is not None:
        ok = {r["track_id"] for r in tracks_table.select(["track_id", "status"]).to_pylist() if r["status"] == "ok"}
    out: dict[str, dict[str, StemSource]] = {}
    missing = 0
    for r in stems_table.to_pylist():
        if ok is not None and r["track_id"] not in ok:
            continue
        if r["present"] is None:
            missing += 1
            continue
        segs = tuple((float(s["start_s"]), float(s["end_s"])) for s in (r["active_segments"] or []))
        out.setdefault(r["track_id"], {})[r["stem"]] = StemSource(
            r["track_id"], r["stem"], r["uri"], float(r["duration_s"]), int(r["sample_rate"]), bool(r["present"]), segs
        )
    if missing and not out:
        raise RemixError(
            "the run's stems manifest has no presence columns (present/active_segments are null): rerun the "
            "separation with `demix run ... --presence classifier` (or energy) into a new output root"
        )
    return out


def _digest(sources: Mapping[str, Mapping[str, StemSource]], config: RemixConfig, run_uri: str) -> str:
    payload = {
        "stems": sorted((s.track_id, s.stem, s.uri, s.present, s.segments) for t in sources.values() for s in t.values()),
        "config": {k: v for k, v in asdict(config).items() if k != "examples"},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:10]


def plan_remixes(sources: Mapping[str, Mapping[str, StemSource]], config: RemixConfig, *, run_uri: str, out: str) -> list[Recipe]:
    """The recipes of ``config.examples`` examples (see the module docstring); deterministic.

    Raises:
        RemixError: no (track, absent stem) pair has a donor.
    """
    names = sorted({s for t in sources.values() for s in t}, key=lambda s: (STEMS.index(s) if s in STEMS else 9, s))
    track_ids = sorted(sources)
    donors = {
        s: [t for t in track_ids if s in sources[t] and sources[t][s].present and sources[t][s].active_s >= config.min_donor_active_s]
        for s in names
    }
    pairs = [
        (t, s) for t in track_ids for s in names
        if s in sources[t] and not sources[t][s].present
        and any(o.present for k, o in sources[t].items() if k != s)
        and any(d != t for d in donors[s])
    ]
    if not pairs:
        absent = sum(1 for t in track_ids for s in sources[t].values() if not s.present)
        raise RemixError(
            f"nothing to remix: {len(track_ids)} tracks, {absent} absent stems, and no absent stem has a donor track "
            f"with that stem active for >= {config.min_donor_active_s:g} s"
        )
    digest = _digest(sources, config, run_uri)
    cover = np.random.default_rng([config.seed, 2**31]).permutation(len(pairs))  # every pair once before repeats
    recipes = []
    for k in range(config.examples):
        rng = np.random.default_rng([config.seed, k])
        track, stem = pairs[int(cover[k % len(pairs)])]
        pool = [d for d in donors[stem] if d != track]
        picks = rng.choice(len(pool), size=min(config.donor_candidates, len(pool)), replace=False)
        cands = [pool[int(i)] for i in picks]
        duration = min(s.duration_s for s in sources[track].values())
        seconds = duration if config.seconds is None or config.seconds >= duration else float(config.seconds)
        offset = float(rng.uniform(0.0, duration - seconds)) if seconds < duration else 0.0
        lo, hi = config.gain_db
        gains = {s: float(rng.uniform(lo, hi)) for s in names}
        beats = tuple(
            sources[c]["drums"].uri if "drums" in sources[c] and sources[c]["drums"].present and stem != "drums" else None
            for c in cands
        )
        recipes.append(
            Recipe(
                example_id=f"rmx-{digest}-{k:06d}", index=k, target_stem=stem, stems=tuple(names),
                recipient={s: asdict(v) for s, v in sources[track].items()},
                donors=tuple(asdict(sources[c][stem]) for c in cands), donor_beats=beats,
                offset_s=round(offset, 6), seconds=round(seconds, 6), gains_db=gains, seed=config.seed,
                plan_digest=digest, run_uri=run_uri, split=config.split, peak=config.peak, out=out,
            )
        )
    return recipes



TRUTH_MIN_ACTIVE_S = 0.25
"""A stem counts as present in an example's ``truth.json`` when it sounds at least this long in it."""


def truth_of(rows: Sequence[dict]) -> dict[str, dict[str, bool]]:
    """``truth.json`` content of a remix split: which stems sound in each example (a recipient stem
    that is silent over the example's window counts as absent). Weak examples are left out: their
    ``weak.json`` says what is known."""
    return {
        r["example_id"]: {s["stem"]: s["role"] != "silent" and (s["active_s"] or 0.0) >= TRUTH_MIN_ACTIVE_S for s in r["stems"]}
        for r in rows if not is_weak(r)
    }


WEAK_REST = "rest"
"""Name of a weak example's second target: the recipient's original excerpt (the sum of its other stems)."""


def is_weak(row: dict) -> bool:
    """Whether a ``remixes`` row is a weak example (its lineage has a ``rest`` part, not every stem)."""
    return any(s["stem"] == WEAK_REST for s in row["stems"])


def consolidated(out: str) -> tuple[pa.Table, pa.Table]:
    """The committed view of a remix output root: ``(remixes, failures)``, one row per example.

    An example committed twice (two runs racing, a retried shard) keeps its latest ``ok`` row; its
    files are the same either way (deterministic keys and content). A failure row is kept only for
    examples that never succeeded.
    """
    remixes, commits = read_committed(out, "remixes", REMIXES_SCHEMA)
    failures, _ = read_committed(out, "failures", FAILURES_SCHEMA)
    when = {c.attempt: c.committed_at for c in commits}
    best: dict[str, dict] = {}
    for r in remixes.to_pylist():
        if r["example_id"] not in best or when.get(r["attempt"], "") > when.get(best[r["example_id"]]["attempt"], ""):
            best[r["example_id"]] = r
    failed: dict[str, dict] = {}
    for r in failures.to_pylist():
        if r["track_id"] not in best:
            if r["track_id"] not in failed or when.get(r["attempt"], "") > when.get(failed[r["track_id"]]["attempt"], ""):
                failed[r["track_id"]] = r
    rows = sorted(best.values(), key=lambda r: r["example_id"])
    return (pa.Table.from_pylist(rows, schema=REMIXES_SCHEMA),
            pa.Table.from_pylist(sorted(failed.values(), key=lambda r: r["track_id"]), schema=FAILURES_SCHEMA))


def committed_examples(out: str) -> set[str]:
    """Example ids already committed ``ok`` under ``out`` (what a rerun skips)."""
    table, _ = read_committed(out, "remixes", REMIXES_SCHEMA)
    return set(table.column("example_id").to_pylist())


def shard_recipes(recipes: Sequence[Recipe], shard_size: int, *, run_id: str) -> list[tuple[str, list[Recipe]]]:
    """``recipes`` cut into shards of ``shard_size``: ``[(shard_id, [Recipe, ...]), ...]``."""
    shards = []
    for i in range(0, len(recipes), shard_size):
        group = list(recipes[i : i + shard_size])
        shards.append((catalog.shard_id(run_id, [r.example_id for r in group], prefix="remix"), group))
    return shards


def commit_examples(out: str, shard_id: str, rows: list[dict], failures: list[FailureRow]) -> Commit:
    """Write one shard's ``remixes`` and ``failures`` parts and create its commit record."""
    tables = {
        "remixes": pa.Table.from_pylist([{**r, "attempt": None} for r in rows], schema=REMIXES_SCHEMA),
        "failures": rows_table(failures, FAILURES_SCHEMA, {}),
    }
    ids = [r["example_id"] for r in rows] + [f.track_id for f in failures]
    return commit_tables(out, shard_id, tables, ids)


def write_truth(out: str, split: str, rows: Sequence[dict]) -> str:
    """Write ``OUT/<split>/truth.json`` (:func:`truth_of` of ``rows``); returns its URI."""
    truth_uri = join(out, split, "truth.json")
    atomic_write(truth_uri, json.dumps(truth_of(rows), indent=1, sort_keys=True).encode())
    return truth_uri
