"""Figures shared by the pipelines' reports."""

from matplotlib.figure import Figure


def message_figure(message: str) -> Figure:
    """A figure that says why there is nothing to plot (the artifact is never missing).

    The text sits in hidden axes: IPython's inline display renders no PNG for a figure
    without axes, so the notebook would show only ``<Figure ...>`` in its place.
    """
    figure = Figure(figsize=(6, 1.5))
    axes = figure.subplots()
    axes.axis("off")
    axes.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return figure
