"""matplotlib for the lab's figures: drawn off-screen (Agg) and written atomically as PNG.

matplotlib is imported on first use: importing the experiment tools stays quick."""

from __future__ import annotations

from nsr.train.fileio import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend: figures go to files, no display is needed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_png(fig, path) -> None:
    """A matplotlib figure as a PNG, written atomically; the figure is closed."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        pyplot().close(fig)
