"""Figures shared by the pipelines' reports."""

from matplotlib.figure import Figure


def message_figure(message: str) -> Figure:
    """A figure that says why there is nothing to plot (the artifact is never missing)."""
    figure = Figure(figsize=(6, 1.5))
    figure.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return figure
