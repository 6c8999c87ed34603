"""The summaries and Markdown reports of the catalog and remix flows: pure functions of the
consolidated manifests and the run's counters (the flows publish the Markdown as a Prefect artifact
and return the summary)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pyarrow as pa

from demix.pipeline.markdown import table

FAILURES_SHOWN = 200
"""Failure rows listed in the catalog report (all are in the summary and ``failures.parquet``)."""

MESSAGE_CHARS = 200
"""Characters of a failure message shown in the catalog report (counted escaped, as before tables)."""


def presence_counts(stems: pa.Table) -> dict[str, list[int]]:
    """``{stem: [present, judged]}`` over the rows of a ``stems`` table that carry a presence verdict."""
    presence: dict[str, list[int]] = {}
    for r in stems.select(["stem", "present"]).to_pylist():
        if r["present"] is not None:
            counts = presence.setdefault(r["stem"], [0, 0])
            counts[0] += int(r["present"])
            counts[1] += 1
    return presence


def catalog_summary(tables: Mapping[str, pa.Table], paths: dict, total: int, skipped: int, stats: Mapping) -> dict:
    """The catalog flow's result: this run's counters (``stats`` of the execute task: ok, failed,
    audio_s, wall_s, and ``interrupted`` when the run was stopped early) and the totals of every
    committed run (``tables``: consolidated manifests)."""
    tracks = tables["tracks"].to_pylist()
    presence = presence_counts(tables["stems"])
    keys = ("track_id", "source_uri", "stage", "error_type", "message")
    return {
        "catalog_tracks": total,
        "skipped_already_committed": skipped,
        "interrupted": bool(stats.get("interrupted")),
        "processed_now": stats["ok"] + stats["failed"],
        "ok_now": stats["ok"],
        "failed_now": stats["failed"],
        "committed_ok_total": sum(r["status"] == "ok" for r in tracks),
        "committed_failed_total": sum(r["status"] == "failed" for r in tracks),
        "hours_of_audio_total": sum((r["duration_s"] or 0.0) for r in tracks if r["status"] == "ok") / 3600,
        "audio_seconds_now": stats["audio_s"],
        "wall_seconds_now": stats.get("wall_s", 0.0),
        "realtime_factor_now": stats["audio_s"] / stats["wall_s"] if stats.get("wall_s") else 0.0,
        "model_stage": dict(stats.get("model_stage") or {}),
        "manifests": paths,
        "presence": {stem: {"present": p, "tracks": n} for stem, (p, n) in presence.items()},
        "failures": [{k: f[k] for k in keys} for f in tables["failures"].to_pylist()],
    }


def model_stage_line(stage: Mapping) -> str:
    """``forwards, mean batch fill, busy fraction`` of a run's model actors, in words."""
    return (
        f"{stage['forwards']} forwards of {stage['chunks']} chunks, batches {100 * stage['fill']:.0f}% full "
        f"({stage['mixed_forwards']} mixing tracks), busy {100 * stage['busy']:.0f}% of its span"
    )


def _shown(message: str, limit: int = MESSAGE_CHARS) -> str:
    """``message`` on one line, cut where its ``|``-escaped form reaches ``limit`` characters."""
    text, used = [], 0
    for ch in message.replace("\n", " "):
        used += 2 if ch == "|" else 1
        if used > limit:
            break
        text.append(ch)
    return "".join(text)


def catalog_markdown(summary: Mapping) -> str:
    """The catalog flow's Markdown report of :func:`catalog_summary`'s ``summary``."""
    rows = [
        ("tracks in catalog", summary["catalog_tracks"]),
        ("skipped (already committed)", summary["skipped_already_committed"]),
        ("separated now", summary["ok_now"]),
        ("failed now", summary["failed_now"]),
        *((("interrupted", "yes: stopped early, rerun to resume"),) if summary.get("interrupted") else ()),
        ("committed ok / failed (all runs)", f"{summary['committed_ok_total']} / {summary['committed_failed_total']}"),
        ("hours of audio (committed)", f"{summary['hours_of_audio_total']:.3f}"),
        ("real-time factor (this run)", f"{summary['realtime_factor_now']:.2f}x"),
        *((("model stage (this run)", model_stage_line(summary["model_stage"])),) if summary.get("model_stage") else ()),
        *((f"{stem} present (committed)", f"{c['present']} of {c['tracks']}") for stem, c in summary["presence"].items()),
    ]
    lines = ["# demix separate-catalog", "", table(("", ""), rows, align="ll"), ""]
    failures = summary["failures"]
    if failures:
        shown = [(f["source_uri"], f["stage"], f["error_type"], _shown(f["message"])) for f in failures[:FAILURES_SHOWN]]
        lines += ["## Failures", "", table(("track", "stage", "error", "message"), shown, align="llll")]
    return "\n".join(lines)


def remix_summary(
    remixes: pa.Table, failures: pa.Table, rows: Sequence[dict], manifests: dict, dataset: str, total: int,
    skipped: int, stats: Mapping,
) -> dict:
    """The remix flow's result: this run's counters (``stats``: ok, failed, wall_s, interrupted), the committed
    ``remixes`` / ``failures`` tables, and ``rows`` (the committed examples of the split)."""
    by_stem: dict[str, int] = {}
    for r in rows:
        by_stem[r["target_stem"]] = by_stem.get(r["target_stem"], 0) + 1
    return {
        "examples_planned": total,
        "skipped_already_committed": skipped,
        "interrupted": bool(stats.get("interrupted")),
        "built_now": stats["ok"],
        "failed_now": stats["failed"],
        "committed_total": remixes.num_rows,
        "failed_total": failures.num_rows,
        "by_target_stem": by_stem,
        "hours_total": sum(r["duration_s"] for r in rows) / 3600,
        "wall_seconds_now": stats.get("wall_s", 0.0),
        "dataset": dataset,
        "manifests": manifests,
        "failures": [{k: f[k] for k in ("track_id", "stage", "error_type", "message")} for f in failures.to_pylist()],
    }


def remix_markdown(summary: Mapping) -> str:
    """The remix flow's Markdown report of :func:`remix_summary`'s ``summary``."""
    by_stem = summary["by_target_stem"]
    rows = [
        ("examples planned", summary["examples_planned"]),
        ("skipped (already committed)", summary["skipped_already_committed"]),
        ("built now / failed now", f"{summary['built_now']} / {summary['failed_now']}"),
        ("committed examples (all runs)", summary["committed_total"]),
        ("target stems", ", ".join(f"{k}: {v}" for k, v in sorted(by_stem.items()))),
        ("hours of audio", f"{summary['hours_total']:.3f}"),
    ]
    return "\n".join(["# demix build-remix-dataset", "", table(("", ""), rows, align="ll"), ""])
