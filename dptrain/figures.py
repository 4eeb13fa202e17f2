"""Figures as PNG bytes (matplotlib, headless Agg backend): every plot of the project ends here,
and the caller writes the bytes atomically where they belong."""

from __future__ import annotations

import io


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig, dpi: int = 120) -> bytes:
    """Lay out, render and close ``fig``; its PNG bytes."""
    return rendered(fig, ("png",), dpi)["png"]


def rendered(fig, formats=("png", "svg"), dpi: int = 120) -> dict[str, bytes]:
    """Lay out ``fig``, render it in each format, close it; {format: bytes}."""
    fig.tight_layout()
    out = {}
    for fmt in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=dpi)
        out[fmt] = buf.getvalue()
    pyplot().close(fig)
    return out
