"""`kedro viz build` produces a static site showing the pipelines."""

import json

from tests.conftest import assert_ok, kedro, make_project


def test_viz_build_contains_the_pipelines_and_their_nodes(tmp_path):
    project = make_project(tmp_path / "project")
    assert_ok(kedro(project, "viz", "build"))

    site = project / "build"
    assert (site / "index.html").is_file()
    graph = json.loads((site / "api/main").read_text())
    assert {
        "monitoring",
        "data_processing",
        "training",
        "evaluation",
        "rollback",
        "rebuild",
        "__default__",
    } <= {pipeline["id"] for pipeline in graph["pipelines"]}
    # The default pipeline (monitoring first): rollback and rebuild run on demand only.
    tasks = {node["name"] for node in graph["nodes"] if node["type"] == "task"}
    assert {
        "monitor_predictions",
        "report_monitoring",
        "ingest_mednist",
        "decode_raw_images",
        "decode_feedback_images",
        "build_model_input",
        "build_training_manifest",
        "report_data",
        "report_feedback",
        "decide_training",
        "train_model",
        "evaluate_model",
        "evaluate_champion",
        "register_and_promote",
    } == tasks
    training = json.loads((site / "api/pipelines/training").read_text())
    assert "train_model" in {node["name"] for node in training["nodes"]}
