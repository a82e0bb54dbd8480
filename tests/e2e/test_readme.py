"""The README runs as written: every command it shows names something that exists.

The commands themselves run elsewhere in the suite (`make airflow` under the real scheduler in
test_airflow.py, the pipelines, the service, the benchmarks' code paths); this module catches a
README that names a make target, an executable, a pipeline, an environment or a parameter
that is not there (any more).
"""

import re
import shlex
from pathlib import Path

import pytest
import yaml
from kedro.framework.project import configure_project, pipelines

from tests.conftest import PROJECT_ROOT

# The README and the benchmarks' record of runs, whose commands run from the project root too.
DOCS = "\n".join(
    (PROJECT_ROOT / name).read_text() for name in ("README.md", "benchmarks/README.md")
)
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", DOCS, re.S)
MAKE_TARGETS = set(re.findall(r"^([\w-]+):", (PROJECT_ROOT / "Makefile").read_text(), re.M))
# Installed by the Makefile (prometheus, chromium) or by the system; the rest are in .venv/bin.
SYSTEM_COMMANDS = {"curl", "prometheus", "mc", "export"}


def shell_commands() -> list[str]:
    """Every command line of the README's bash blocks: continuations joined, comments cut."""
    commands = []
    for language, body in BLOCKS:
        if language != "bash":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            command = line.split(" #")[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def words_of(command: str) -> list[str]:
    """The command's words without leading ``VAR=value`` assignments (placeholders kept)."""
    words = shlex.split(command.replace("<", "'<").replace(">", ">'"))
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words.pop(0)
    return words


def base_parameters() -> dict:
    merged = {}
    for path in (PROJECT_ROOT / "conf/base").glob("parameters*.yml"):
        merged.update(yaml.safe_load(path.read_text()))
    return merged


def has_parameter(parameters: dict, dotted: str) -> bool:
    node = parameters
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


COMMANDS = shell_commands()


def test_the_readme_shows_commands():
    assert len(COMMANDS) > 20  # the parser found the blocks: a broken regex would pass below


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_names_what_exists(command):
    words = words_of(command)
    program = words[0]
    if program == "make":
        assert set(words[1:]) <= MAKE_TARGETS, f"no such make target in {command!r}"
    elif program.startswith(".venv/bin/"):
        assert (PROJECT_ROOT / program).is_file(), f"{program} is not installed by make install"
        if Path(program).name == "python":
            assert (PROJECT_ROOT / words[1]).is_file(), f"{words[1]} does not exist"
    elif program in ("kedro", "mlflow"):
        assert (PROJECT_ROOT / ".venv/bin" / program).is_file()
    else:
        assert program in SYSTEM_COMMANDS, f"unknown program in {command!r}: check it, list it"


KEDRO_RUNS = [words for words in map(words_of, COMMANDS) if words[:2] == ["kedro", "run"]]


@pytest.mark.parametrize("words", KEDRO_RUNS, ids=" ".join)
def test_every_kedro_run_names_a_pipeline_an_environment_and_parameters_that_exist(words):
    configure_project("medical_ct")
    options = dict(zip(words[2::2], words[3::2], strict=False))
    assert "--pipeline" not in options, "Kedro 1.7 deprecates --pipeline: write --pipelines"
    for name in filter(None, options.get("--pipelines", "").split(",")):
        assert name in pipelines, f"no pipeline {name!r}"
    if "--env" in options:
        assert (PROJECT_ROOT / "conf" / options["--env"]).is_dir()
    parameters = base_parameters()
    for pair in filter(None, options.get("--params", "").split(",")):
        name = pair.split("=")[0]
        assert has_parameter(parameters, name), f"no parameter {name!r} in conf/base"


@pytest.mark.parametrize(
    "source", [body for language, body in BLOCKS if language == "python"], ids=lambda _: "python"
)
def test_every_python_example_compiles(source):
    compile(source, "README", "exec")


def test_each_bash_block_is_one_shell_that_sets_what_its_airflow_commands_need():
    """A reader pastes a block into one shell: a command meant for another shell, written in
    the block after the exports, ran there without them (``airflow dags unpause`` then used
    ``~/airflow``, an empty database)."""
    for language, body in BLOCKS:
        if language != "bash":
            continue
        assert not re.search(r"(another|second|other) shell", body, re.I), body
        lines = [line.strip() for line in body.splitlines()]
        airflow = [n for n, line in enumerate(lines) if re.match(r"(\S*/)?airflow ", line)]
        if airflow:
            exported = "\n".join(lines[: airflow[0]])
            assert re.search(r"\bAIRFLOW_HOME=", exported), body
