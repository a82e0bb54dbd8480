"""The monitoring report: plots and one HTML page a person reads, from the run's summary."""

import base64
import html
import io
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from medical_ct.plots import message_figure


def unusual_images_figure(images: np.ndarray, rows: list[dict[str, Any]]) -> Figure:
    """The new images farthest from the training data in the champion's features."""
    if not len(images):
        return message_figure("No new images with pixels")
    columns = min(8, len(images))
    count = -(-len(images) // columns)
    figure = Figure(figsize=(1.8 * columns, 2.1 * count))
    grid = figure.subplots(count, columns, squeeze=False)
    for axes in grid.flat:
        axes.axis("off")
    for axes, image, row in zip(grid.flat, images, rows, strict=False):
        axes.imshow(image, cmap="gray", vmin=0, vmax=255)
        axes.set_title(
            f"{row['label']} {row['confidence']:.2f}\ndistance x{row['distance_ratio']:.1f}",
            fontsize=8,
        )
    figure.suptitle(
        "Most unusual recent images (distance to the nearest training class, x its radius)"
    )
    figure.tight_layout()
    return figure


def history_figure(history: list[dict[str, Any]]) -> Figure:
    """Input drift score, estimated accuracy and low-confidence share, run after run."""
    if not history:
        return message_figure("No monitoring run has measured records yet")
    figure = Figure(figsize=(9, 4))
    axes = figure.subplots()
    runs = np.arange(1, len(history) + 1)
    for key, label in (
        ("input_drift_score", "input drift score (share of features drifted)"),
        ("estimated_accuracy", "estimated accuracy"),
        ("low_confidence_share", "share under the review threshold"),
    ):
        values = [np.nan if point.get(key) is None else point[key] for point in history]
        axes.plot(runs, values, marker="o", label=label)
    axes.set_xticks(runs, [point["last_record_at"][:10] for point in history], rotation=45)
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("last record of each monitoring run")
    axes.legend(fontsize=8)
    axes.set_title("Drift over time")
    figure.tight_layout()
    return figure


def class_mix_figure(summary: dict[str, Any]) -> Figure:
    """Predicted class shares per model version next to the training class mix."""
    if summary.get("status") != "measured":
        return message_figure(summary.get("message", "Nothing measured"))
    classes = list(summary["training_class_mix"])
    bars = {"training": list(summary["training_class_mix"].values())}
    for version, figures in summary["versions"].items():
        counts = np.array([figures["prediction_drift"]["class_counts"][c] for c in classes])
        bars[f"version {version} predicted"] = (counts / max(counts.sum(), 1)).tolist()
    figure = Figure(figsize=(9, 4))
    axes = figure.subplots()
    width = 0.8 / len(bars)
    for index, (label, shares) in enumerate(bars.items()):
        axes.bar(np.arange(len(classes)) + index * width, shares, width, label=label)
    axes.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes)
    axes.set_ylabel("share")
    axes.legend(fontsize=8)
    axes.set_title("Class mix: predicted against training")
    figure.tight_layout()
    return figure


def confidence_figure(summary: dict[str, Any]) -> Figure:
    """Histogram of the top probability, with the review threshold."""
    if summary.get("status") != "measured":
        return message_figure(summary.get("message", "Nothing measured"))
    histogram = summary["confidence_histogram"]
    edges = np.array(histogram["edges"])
    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    axes.bar(edges[:-1], histogram["counts"], np.diff(edges), align="edge", edgecolor="white")
    axes.axvline(summary["review_threshold"], color="red", label="review threshold")
    axes.set_xlabel("confidence (calibrated top probability)")
    axes.set_ylabel("predictions")
    axes.legend()
    axes.set_title(f"Confidence of {summary['records']} predictions")
    figure.tight_layout()
    return figure


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    return base64.b64encode(buffer.getvalue()).decode()


def _number(value: Any, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" if percent else f"{value:.3g}"


def html_page(summary: dict[str, Any], figures: dict[str, Figure]) -> str:
    """One self-contained page: status, alerts, the figures per version, the plots."""
    escape = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Monitoring</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em}"
        ".alert{color:#a00}</style></head><body>",
        "<h1>Monitoring of the champion</h1>",
        f"<p>Run at {escape(summary['run_at'])}; champion version "
        f"{escape(str(summary.get('champion_version', '-')))}; "
        f"{summary.get('records', 0)} new predictions.</p>",
    ]
    if summary.get("status") != "measured":
        parts.append(f"<p>{escape(summary.get('message', ''))}</p>")
    if summary.get("alerts"):
        parts.append("<h2 class='alert'>Alerts</h2><ul>")
        parts += [f"<li class='alert'>{escape(alert)}</li>" for alert in summary["alerts"]]
        parts.append("</ul>")
    elif summary.get("status") == "measured":
        parts.append("<p>No threshold crossed.</p>")
    if summary.get("status") == "measured":
        drift = summary["input_drift"]
        parts.append("<h2>Input drift</h2>")
        if drift.get("tested"):
            parts.append(
                f"<p>{_number(drift['score'], percent=True)} of the image features drifted "
                f"(Kolmogorov-Smirnov p &lt; {drift['p_value']} and statistic &ge; "
                f"{drift['min_ks_statistic']}; {drift['current_images']} new against "
                f"{drift['reference_images']} training images).</p><table><tr><th>feature</th>"
                "<th>KS statistic</th><th>p-value</th><th>drifted</th></tr>"
            )
            parts += [
                f"<tr><td>{escape(name)}</td><td>{_number(f['statistic'])}</td>"
                f"<td>{_number(f['p_value'])}</td>"
                f"<td>{'yes' if f['drifted'] else 'no'}</td></tr>"
                for name, f in drift["features"].items()
            ]
            parts.append("</table>")
        else:
            parts.append(f"<p>Not tested: {escape(drift.get('reason', ''))}</p>")
        parts.append(
            "<h2>Per model version</h2><table><tr><th>version</th><th>predictions</th>"
            "<th>estimated accuracy</th><th>under review threshold</th>"
            "<th>class mix p-value</th><th>feedback error rate</th></tr>"
        )
        for version, figures_of in summary["versions"].items():
            feedback = figures_of["feedback"]
            parts.append(
                f"<tr><td>{escape(version)}</td><td>{figures_of['records']}</td>"
                f"<td>{_number(figures_of['estimated_accuracy'], percent=True)}</td>"
                f"<td>{_number(figures_of['low_confidence_share'], percent=True)}</td>"
                f"<td>{_number(figures_of['prediction_drift']['p_value'])}</td>"
                f"<td>{_number(feedback['error_rate'], percent=True)} "
                f"({feedback['errors']}/{feedback['accepted_corrections']})</td></tr>"
            )
        parts.append("</table>")
        if summary.get("unusual"):
            parts.append(
                "<h2>Most unusual recent images</h2>"
                "<p>The grid: monitoring/plots/unusual_images.png.</p>"
                "<table><tr><th>prediction id</th><th>at</th><th>label</th><th>confidence</th>"
                "<th>distance ratio</th></tr>"
            )
            parts += [
                f"<tr><td>{escape(row['prediction_id'])}</td><td>{escape(row['predicted_at'])}"
                f"</td><td>{escape(row['label'])}</td><td>{row['confidence']:.3f}</td>"
                f"<td>{row['distance_ratio']:.2f}</td></tr>"
                for row in summary["unusual"]
            ]
            parts.append("</table>")
    for title, figure in figures.items():
        parts.append(
            f"<h2>{escape(title.replace('_', ' ').capitalize())}</h2>"
            f"<img alt='{escape(title)}' src='data:image/png;base64,{_png(figure)}'>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)
