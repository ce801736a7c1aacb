"""How hhtld shows sizes and tables on a terminal (``inspect``, ``verify``, ``encode``)."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """``107.45 MB``, ``584.00 kB``: decimal units, two decimals (what file sizes are reported in)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def format_table(rows: list[list[str]], header: list[str], right: set[int] = frozenset()) -> str:
    """A plain-text table: the header, a rule of dashes, the rows; the columns in ``right``
    right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows])


__all__ = ["format_table", "human_bytes"]
