"""The registry: which pipelines exist, and the tag that names each node's pipeline."""

from kedro.framework.project import configure_project


def test_every_node_is_tagged_with_its_own_pipeline_alone():
    """The weekly DAG runs each task from the pipeline its node's tag names, so that Kedro
    imports that pipeline alone; a wrong or second tag would run it from the wrong one."""
    configure_project("medical_ct")
    from medical_ct.pipeline_registry import register_pipelines

    pipelines = register_pipelines()

    for name, pipeline in pipelines.items():
        if name != "__default__":
            assert {tag for node in pipeline.nodes for tag in node.tags} == {name}
    default_tags = [node.tags for node in pipelines["__default__"].nodes]
    assert all(len(tags) == 1 for tags in default_tags)
    assert set().union(*default_tags) == {"monitoring", "data_processing", "training", "evaluation"}
