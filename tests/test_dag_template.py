"""The DAG template (``make dag``): each task runs its node from the pipeline its tag names."""

import jinja2
import pytest
from kedro.pipeline import Node, Pipeline
from slugify import slugify

from tests.conftest import PROJECT_ROOT

TEMPLATE = PROJECT_ROOT / "src/medical_ct/airflow_dag_template.j2"


def render(pipeline: Pipeline) -> str:
    """The DAG of ``pipeline``, rendered as `kedro airflow create` 0.11 renders the template."""
    environment = jinja2.Environment(
        autoescape=True, loader=jinja2.FileSystemLoader(TEMPLATE.parent), lstrip_blocks=True
    )
    environment.filters["slugify"] = slugify
    return environment.get_template(TEMPLATE.name).render(
        dag_name="medical_ct",
        node_objs=pipeline.group_nodes_by(group_by=None),
        env="s3",
        pipeline_name="__default__",
        package_name="medical_ct",
        pipeline=pipeline,
        conf_source="",
    )


def identity(value):
    return value


def test_a_node_tagged_with_its_pipeline_runs_from_it():
    pipeline = Pipeline([Node(identity, "a", "b", name="train_model", tags=["training"])])
    assert 'run_kedro_nodes("training", "train_model")' in render(pipeline)


def test_a_node_with_a_second_tag_stops_the_generation_naming_its_tags():
    """``tags | first`` took any of a node's tags (a set, ordered by the process's hash seed):
    with a second tag the task could run its node from a pipeline of that name, which does not
    exist."""
    pipeline = Pipeline([Node(identity, "a", "b", name="train_model", tags=["training", "gpu"])])
    with pytest.raises(KeyError, match="node train_model has the tags gpu, training but"):
        render(pipeline)
