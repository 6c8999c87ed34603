"""Markdown tables, the one way reports and summaries write them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def table(header: Sequence[str], rows: Iterable[Sequence[object]], *, align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table. ``align`` holds ``'l'`` or ``'r'`` per column (default: the
    first column left, the others right). Cells are ``str()``-ed; ``|`` in a cell is escaped."""
    align = list(align) if align is not None else ["l"] + ["r"] * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(f"align has {len(align)} entries for {len(header)} columns")

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    rule = "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
