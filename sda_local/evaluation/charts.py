"""matplotlib for the PNG charts, when the ``plot`` extra is installed."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
