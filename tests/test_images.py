"""The product in its container images (`make images`): the demo's corpus produced and validated
by the simulator image and consumed by the processor image, against the project's own Kafka and
PostgreSQL on this host. `make test-images` runs it.

The containers reach the host's loopback at 10.0.2.2 (podman's slirp4netns network with
allow_host_loopback): the broker has a listener advertised there, PostgreSQL and the simulator's
published port are reached through it, and the host reaches each container through its
published port, as a user would."""

from __future__ import annotations

import dataclasses
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from paystream.lag import committed_lag
from paystream_tooling.devenv.kafka import KafkaBroker, create_topics
from paystream_tooling.devenv.processes import free_port
from paystream_tooling.devenv.stack import DB_PASSWORD, DB_USER, Stack
from paystream_tooling.images import Engine, find_engine
from paystream_tooling.reconcile import reconcile
from tests.conftest import wait_for

pytestmark = [pytest.mark.images, pytest.mark.timeout(900)]

HOST_FROM_CONTAINER = "10.0.2.2"
"""This host's loopback as a container on slirp4netns with allow_host_loopback sees it."""
NETWORK = "slirp4netns:allow_host_loopback=true"
TAG = version("paystream")
GRACE_S = 30
"""`podman stop`'s grace period: SIGTERM, then SIGKILL after this."""


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    said: list[str] = []
    found = find_engine(tmp_path_factory.mktemp("engine"), said.append)
    if found is None or found.name != "podman":
        reason = "no podman runs a container here" + (f" ({said[-1]})" if said else "")
        if os.environ.get("CI") == "true":
            pytest.fail(f"the image tests cannot run: {reason}")
        pytest.skip(reason)
    for target in ("processor", "simulator"):
        if not found.has_image(f"paystream-{target}:{TAG}"):
            pytest.fail(f"paystream-{target}:{TAG} is not built: run make images")
    return found


@dataclasses.dataclass(frozen=True)
class Broker:
    kafka: KafkaBroker
    from_containers: str
    """Its bootstrap address as the containers reach it."""


@pytest.fixture(scope="module")
def broker(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker of the module's own with a listener the containers reach."""
    home = tmp_path_factory.mktemp("images-kafka")
    port = free_port()
    kafka = KafkaBroker(
        home / "kafka",
        stack.home.parent / "cache",
        extra_listeners={"CONTAINERS": f"127.0.0.1:{port}"},
        advertised_hosts={"CONTAINERS": HOST_FROM_CONTAINER},
    )
    kafka.start()
    try:
        yield Broker(kafka, f"{HOST_FROM_CONTAINER}:{port}")
    finally:
        kafka.stop()


@dataclasses.dataclass
class Deployment:
    """One test's topics, database, secrets and containers."""

    engine: Engine
    stack: Stack
    broker: Broker
    folder: Path
    name: str
    sim_port: int = dataclasses.field(default_factory=free_port)
    web_port: int = dataclasses.field(default_factory=free_port)
    token: str = "an-operator-token-of-32-characters!"
    started: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.online, self.offline = f"online_{self.name}", f"offline_{self.name}"
        create_topics(self.broker.kafka.bootstrap, [self.online, self.offline], 3)
        self.database_url = self.stack.fresh_database(self.name)
        port = self.stack.postgres.port if self.stack.postgres else 5432
        # The processor's URL carries no password: that comes from a mounted secret file.
        self.container_db = f"postgresql://{DB_USER}@{HOST_FROM_CONTAINER}:{port}/{self.name}"
        self.secrets = self.folder / "secrets"
        self.secrets.mkdir()
        (self.secrets / "operator_token").write_text(self.token + "\n")
        (self.secrets / "database_password").write_text(DB_PASSWORD + "\n")
        for secret in self.secrets.iterdir():
            secret.chmod(0o444)  # the image's user (uid 10001) reads them; nobody writes

    def _start(
        self, name: str, port: str, env: dict[str, str], image: str, *argv: str, volume: str = ""
    ) -> None:
        """A container `name` of `image` on the network that reaches this host, publishing
        `port` (host:container) on this host's loopback, with the topics and the broker set."""
        env = {
            "PAYSTREAM_KAFKA_BOOTSTRAP_SERVERS": self.broker.from_containers,
            "PAYSTREAM_ONLINE_TOPIC": self.online,
            "PAYSTREAM_OFFLINE_TOPIC": self.offline,
            "PAYSTREAM_DATABASE_URL": self.container_db,
            **env,
        }
        self.engine.run(
            *("run", "--detach", "--name", name, "--network", NETWORK),
            *("-p", f"127.0.0.1:{port}"),
            *(("-v", volume) if volume else ()),
            *(arg for variable, value in env.items() for arg in ("-e", f"{variable}={value}")),
            f"{image}:{TAG}",
            *argv,
        )
        self.started.append(name)

    def start_simulator(self, records: int, rate: float) -> None:
        name = f"{self.name}-simulator"
        self._start(
            name,
            f"{self.sim_port}:8080",
            {"PAYSTREAM_DATABASE_PASSWORD": DB_PASSWORD},
            "paystream-simulator",
            *("simulator", "--host", "0.0.0.0", "--port", "8080"),
            *("--records", str(records), "--rate", str(rate), "--latency-ms", "5"),
        )
        wait_for(
            lambda: self.status(f"{self.sim_url}/status") == 200,
            60,
            "the simulator",
            failed=lambda: self.running(name),
        )

    def start_processor(self, n: int) -> str:
        """A processor container whose database password and operator token come from files
        mounted read-only."""
        name = f"{self.name}-processor-{n}"
        third_party = f"http://{HOST_FROM_CONTAINER}:{self.sim_port}"
        env = {
            "PAYSTREAM_DATABASE_PASSWORD_FILE": "/run/secrets/database_password",
            "PAYSTREAM_OPERATOR_TOKEN_FILE": "/run/secrets/operator_token",
            "PAYSTREAM_GATEWAY_URL": third_party,
            "PAYSTREAM_LOG_URL": third_party,
            "PAYSTREAM_GROUP_ID": self.name,
        }
        volume = f"{self.secrets}:/run/secrets:ro"
        self._start(name, f"{self.web_port}:8000", env, "paystream-processor", volume=volume)
        return name

    @property
    def sim_url(self) -> str:
        return f"http://127.0.0.1:{self.sim_port}"

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @staticmethod
    def status(url: str, **headers: str) -> int | None:
        """The HTTP status `url` answers with (None: no answer)."""
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5):
                return 200
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    @staticmethod
    def read(url: str) -> bytes:
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body: bytes = response.read()
        return body

    def get(self, url: str) -> Any:
        return orjson.loads(self.read(url))

    def running(self, container: str) -> str | None:
        """None while `container` runs; otherwise what it said (for a wait to end with)."""
        state = self.engine.text("inspect", "--format", "{{.State.Running}}", container)
        return None if state == "true" else f"{container} exited:\n{self.logs(container)}"

    def stored(self) -> int:
        with psycopg.connect(self.database_url) as conn:
            row = conn.execute("SELECT count(*) FROM payments").fetchone()
        return int(row[0]) if row else 0

    def lag(self) -> int:
        return committed_lag(self.broker.kafka.bootstrap, self.name, [self.online, self.offline])

    def settled(self) -> bool:
        with psycopg.connect(self.database_url) as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE reported_at IS NULL) FROM paystream.kept_records"
            ).fetchone()
        unreported = int(row[0]) if row else 0
        return (
            bool(self.get(f"{self.sim_url}/status").get("done"))
            and not self.lag()
            and not unreported
        )

    def logs(self, container: str) -> str:
        result = self.engine.run("logs", container, check=False)
        return (result.stdout + result.stderr).decode(errors="replace")[-4000:]

    def remove(self) -> None:
        for name in self.started:
            self.engine.run("rm", "--force", "--time", "0", name, check=False)


@pytest.fixture
def deployment(
    engine: Engine, stack: Stack, broker: Broker, tmp_path: Path
) -> Iterator[Deployment]:
    name = f"img{int(time.time() * 1000) % 10**9}"
    made = Deployment(engine, stack, broker, tmp_path, name)
    try:
        yield made
    finally:
        made.remove()


def test_the_demo_runs_in_the_images_and_reconciles(deployment: Deployment) -> None:
    """The processor image consumes the demo's corpus that the simulator image produces and
    validates, is stopped with SIGTERM mid-stream (it drains and exits 0 within the grace
    period), and a new container of it finishes: nothing lost, nothing doubled. Meanwhile its
    health check passes, readiness and metrics answer through the published port, and its
    secrets come from files mounted read-only."""
    d = deployment
    d.start_simulator(records=3000, rate=300)
    first = d.start_processor(1)
    ready = f"{d.web_url}/health/ready"
    wait_for(lambda: d.status(ready) == 200, 90, "readiness", failed=lambda: d.running(first))
    assert 0 == d.engine.run("healthcheck", "run", first, check=False).returncode, d.logs(first)
    # The token came from its file: payment data answers with it and is refused without it.
    assert 200 == d.status(f"{d.web_url}/api/state", **{"X-Paystream-Token": d.token})
    assert d.status(f"{d.web_url}/api/state") in (401, 403)

    d.get(f"{d.sim_url}/start?profile=original")
    wait_for(lambda: d.stored() >= 300, 60, "payments stored before the stop")
    assert not d.get(f"{d.sim_url}/status")["done"], "the stream ended before the stop"
    began = time.monotonic()
    d.engine.run("stop", "--time", str(GRACE_S), first, timeout=GRACE_S + 30)
    stopped_s = time.monotonic() - began
    exit_code = d.engine.text("inspect", "--format", "{{.State.ExitCode}}", first)
    assert "0" == exit_code, d.logs(first)
    assert stopped_s < GRACE_S, f"stopped after {stopped_s:.1f} s: killed, not drained"
    assert "Traceback" not in d.logs(first)
    print(f"images: SIGTERM to exit {stopped_s:.1f} s; {d.stored()} stored before the restart")

    second = d.start_processor(2)
    wait_for(d.settled, 300, "the stream to settle", failed=lambda: d.running(second))
    metrics = d.read(f"{d.web_url}/metrics").decode()
    assert "paystream_payments_stored_total" in metrics
    assert "credit_card" not in metrics

    ledger = d.get(f"{d.sim_url}/ledger")["records"]
    reports = d.get(f"{d.sim_url}/logs")
    with psycopg.connect(d.database_url) as conn:
        report = reconcile(conn, ledger, reports, d.lag())
    print(f"images: {report}")
    assert report.records == 3000
    assert (0, 0) == (report.lost, report.doubled), report
    assert report.ok, report


def test_the_images_run_as_their_own_user_with_the_runtime_alone(engine: Engine) -> None:
    """The processor image runs as uid 10001, holds paystream and not its tooling, and has no
    pip, compiler or pip cache."""
    image = f"paystream-processor:{TAG}"
    script = (
        "id -u; python3 -c 'import paystream' && echo runtime;"
        " python3 -c 'import paystream_tooling' 2>/dev/null && echo tooling;"
        " for tool in pip pip3 gcc cc; do command -v $tool; done;"
        " ls -d /root/.cache/pip /home/paystream/.cache/pip 2>/dev/null; true"
    )
    ran = engine.run("run", "--rm", "--entrypoint", "sh", image, "-c", script)
    assert ["10001", "runtime"] == ran.stdout.decode().split()
    healthcheck = engine.text("image", "inspect", "--format", "{{json .Config.Healthcheck}}", image)
    assert "/health/live" in healthcheck
