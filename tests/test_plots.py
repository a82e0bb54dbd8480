"""Shared report figures render wherever a person looks at them: MLflow artifacts and notebooks."""

import io

from IPython.core.pylabtools import print_figure

from medical_ct.plots import message_figure


def test_a_message_figure_renders_as_png_in_a_notebook_and_to_a_file():
    figure = message_figure("No misclassified test images")

    shown = print_figure(figure, "png")  # what IPython's inline display sends to the notebook
    saved = io.BytesIO()
    figure.savefig(saved, format="png")

    assert shown and shown.startswith(b"\x89PNG")
    assert saved.getvalue().startswith(b"\x89PNG")
