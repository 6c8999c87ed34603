"""Static HTML report pages: one self-contained file (inline CSS and a few lines of inline script, no
network requests) beside its media, linked by relative paths, so a report folder works opened from
disk and from an object store's static hosting. Used by the run report (``batch/html.py``) and the
evaluation report (``learn/report.py``); the plots are in :mod:`demix.pipeline.io.plots`.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from urllib.parse import quote

from demix.pipeline.io.storage import atomic_write

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em 2em;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;background:#f4f4f4}table.sortable th:after{content:" \\2195";color:#aaa}
.note{color:#555;font-size:.9em}.error{color:#b00}
.cards{display:flex;flex-wrap:wrap;gap:1em}
.card{border:1px solid #ddd;border-radius:6px;padding:.6em .8em;min-width:9em}
.card b{display:block;font-size:1.4em}
.track{border:1px solid #ddd;border-radius:6px;padding:.6em;margin:.8em 0}
.stems{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:.8em}
.stem img{display:block;width:320px;height:auto;border:1px solid #eee}
.stem audio{width:320px;height:32px}
.timeline{position:relative;width:320px;height:10px;background:#eee;margin:3px 0}
.timeline span{position:absolute;top:0;height:10px;background:#2b8cbe}
.bar{display:inline-block;height:.8em;background:#2b8cbe;vertical-align:middle}
.pair{display:grid;grid-template-columns:auto 330px 330px;gap:.4em .8em;align-items:center}
"""

_SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){
    th.addEventListener('click',function(){
      var body=t.tBodies[0],rows=Array.from(body.rows),up=th.dataset.dir!=='up';
      t.querySelectorAll('th').forEach(function(h){delete h.dataset.dir;});th.dataset.dir=up?'up':'down';
      function key(r){var c=r.cells[i],v=c.dataset.v!==undefined?c.dataset.v:c.textContent;var n=parseFloat(v);
        return isNaN(n)?v.toLowerCase():n;}
      rows.sort(function(a,b){var x=key(a),y=key(b);
        if(typeof x!==typeof y){return (typeof x==='number'?-1:1)*(up?1:-1);}
        return (x<y?-1:x>y?1:0)*(up?1:-1);});
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
});
"""


class Raw(str):
    """Text that is HTML already: table cells and page parts pass it through unescaped."""


def esc(x: object) -> str:
    """``x`` as HTML text (a :class:`Raw` unchanged)."""
    return x if isinstance(x, Raw) else html.escape(str(x))


def href(*parts: str) -> str:
    """A relative link from path components (each percent-encoded)."""
    return "/".join(quote(p, safe="") for p in parts)


def num(value: float | int | None, fmt: str = "{:.2f}") -> Raw:
    """A numeric table cell: right-aligned, sorted by value (``n/a`` for None or NaN sorts last)."""
    if value is None or value != value:
        return Raw('<td class="num" data-v="">n/a</td>')
    text, v = fmt.format(value), float(value)
    key = repr(v) if abs(v) != float("inf") else ("Infinity" if v > 0 else "-Infinity")  # what parseFloat reads
    return Raw(f'<td class="num" data-v="{key}">{html.escape(text)}</td>')


def table(header: Sequence[str], rows: Iterable[Sequence[object]], *, cls: str = "", ident: str = "") -> str:
    """An HTML table; a cell made by :func:`num` (a whole ``<td>``) is used as it is, other cells are
    escaped (:class:`Raw` ones are not) and put in a ``<td>``."""

    def cell(c: object) -> str:
        return c if isinstance(c, Raw) and c.startswith("<td") else f"<td>{esc(c)}</td>"

    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in rows)
    attrs = (f' id="{esc(ident)}"' if ident else "") + (f' class="{esc(cls)}"' if cls else "")
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def cards(items: Iterable[tuple[str, object]]) -> str:
    """Headline numbers as a row of cards: ``(label, value)``."""
    return '<div class="cards">' + "".join(f'<div class="card"><b>{esc(v)}</b>{esc(k)}</div>' for k, v in items) + "</div>"


def timeline(segments: Sequence[dict] | None, duration_s: float) -> str:
    """Active segments (``{start_s, end_s}``) as bars on a track-long strip."""
    if not duration_s or duration_s <= 0:
        return ""
    spans = []
    for s in segments or ():
        lo, hi = max(0.0, s["start_s"]), min(duration_s, s["end_s"])
        if hi > lo:
            spans.append(f'<span style="left:{100 * lo / duration_s:.2f}%;width:{100 * (hi - lo) / duration_s:.2f}%"></span>')
    label = f"{len(spans)} active segment(s) over {duration_s:.1f} s"
    return f'<div class="timeline" title="{label}">{"".join(spans)}</div>'


def page(title: str, parts: Iterable[str]) -> str:
    """A whole self-contained HTML page: ``parts`` are HTML (escape text with :func:`esc`)."""
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{esc(title)}</title>",
            f"<style>{_CSS}</style>",
            "</head><body>",
            f"<h1>{esc(title)}</h1>",
            *parts,
            f"<script>{_SORT_JS}</script>",
            "</body></html>",
        ]
    )


def publish(uri: str, data: bytes | str) -> None:
    """Write one report file atomically (:func:`atomic_write`; on S3 with its ``Content-Type`` from
    the name, so static hosting serves pages as HTML and clips as audio).

    Raises:
        StorageError: the file cannot be written.
    """
    atomic_write(uri, data.encode("utf-8") if isinstance(data, str) else data)
