"""Wiring of the monitoring pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import monitor_predictions, report_monitoring


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=monitor_predictions,
                inputs=[
                    "prediction_log",
                    "previous_monitoring_state",
                    "monitoring_run",
                    "champion_model",
                    "monitoring_reference",
                    "monitoring_reference_classes",
                    "accepted_feedback_records",
                    "previous_accepted_records",
                    "revoked_feedback_records",
                    "params:monitoring",
                ],
                outputs=[
                    "monitoring_summary",
                    "monitoring_metrics",
                    "monitoring_unusual_images_plot",
                    "monitoring_state",  # saved last: a run whose saves failed is read again
                ],
                name="monitor_predictions",
            ),
            Node(
                func=report_monitoring,
                inputs="monitoring_summary",
                outputs=[
                    "monitoring_report",
                    "monitoring_drift_history_plot",
                    "monitoring_class_mix_plot",
                    "monitoring_confidence_plot",
                    "monitoring_alert",
                ],
                name="report_monitoring",
            ),
        ]
    )
