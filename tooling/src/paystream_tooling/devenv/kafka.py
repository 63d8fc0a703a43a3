"""Real Apache Kafka from Maven jars, in KRaft mode: one combined broker + controller
(`KafkaBroker`), or a cluster of several (`KafkaCluster`) whose nodes can each be killed,
stopped and started again."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from paystream.errors import DevenvError
from paystream_tooling import polling
from paystream_tooling.devenv import network
from paystream_tooling.devenv.certs import ServerCertificate
from paystream_tooling.devenv.processes import ChildProcess, ensure_port_free, free_port

KAFKA_VERSION = "4.1.1"
_POM = Path(__file__).with_name("kafka-pom.xml")

_LOG4J2 = """\
Configuration:
  status: warn
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        Pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: WARN
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: kafka.server.KafkaServer
        level: INFO
      - name: kafka.server.BrokerServer
        level: INFO
"""


def require_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise DevenvError(f"'{name}' is not on PATH; {hint}.")
    return path


def kafka_jars(cache_dir: Path) -> Path:
    """Resolve the broker's jars with Maven once; later calls reuse the folder."""
    libs = cache_dir / f"kafka-{KAFKA_VERSION}"
    stamp = libs / ".complete"
    if stamp.exists():
        return libs
    mvn = require_tool(
        "mvn", "install Maven (e.g. apt-get install maven) so the Kafka jars can be fetched"
    )
    require_tool("java", "install a JDK 17 or newer (e.g. apt-get install openjdk-17-jdk-headless)")
    libs.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(_POM),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={libs}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise DevenvError(
            "Maven could not fetch the Kafka broker jars; check access to Maven Central:\n"
            + (result.stdout + result.stderr)[-2000:]
        )
    stamp.touch()
    return libs


@dataclass(frozen=True, slots=True)
class Quorum:
    """The controller quorum a node of a cluster belongs to (a static one: every voter named)."""

    cluster_id: str
    voters: str
    """`id@host:port` of each controller, comma-separated (controller.quorum.voters)."""
    replication: int
    """The replication factor of the internal topics and the default of new ones."""


@dataclass(frozen=True, slots=True)
class SecureListener:
    """A SASL_SSL listener beside the plaintext one, as a managed cluster has: SCRAM-SHA-512
    for this user, TLS with this certificate."""

    tls: ServerCertificate
    username: str
    password: str


class KafkaBroker:
    """Formats a KRaft log directory and runs `kafka.Kafka` as a child process."""

    def __init__(
        self,
        data_dir: Path,
        cache_dir: Path,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        secure: SecureListener | None = None,
        group_protocols: str = "classic,consumer",
        extra_listeners: Mapping[str, str] | None = None,
        advertised_hosts: Mapping[str, str] | None = None,
        node_id: int = 1,
        controller_port: int = 0,
        quorum: Quorum | None = None,
        host_namespace: network.TestHost | None = None,
    ):
        """`group_protocols`: the consumer group protocols the broker accepts ("classic" alone
        is a broker without KIP-848's). `extra_listeners`: more plaintext listeners, name →
        host:port, each advertised as itself (clients in a network namespace of their own) or,
        named in `advertised_hosts`, as that host at the same port (containers that reach this
        host's loopback at an address of their own).
        `host_namespace`: run in that test host's network namespace, listening on every
        address there and advertised as `host` (its end of the broker link)."""
        self.data_dir = data_dir
        self.cache_dir = cache_dir
        self.host = host
        self.host_namespace = host_namespace
        # A namespace of our own has every port free; `host` is not an address of ours.
        probe = "127.0.0.1" if host_namespace is not None else host
        self.port = port or free_port(probe)
        self.controller_port = controller_port or free_port(probe)
        self.node_id = node_id
        self.quorum = quorum
        self.secure = secure
        self.secure_port = free_port(host) if secure else 0
        self.group_protocols = group_protocols
        self.extra_listeners = dict(extra_listeners or {})
        self.advertised_hosts = dict(advertised_hosts or {})
        self._process: ChildProcess | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def secure_client(self) -> dict[str, str]:
        """librdkafka properties of a client of the SASL_SSL listener."""
        assert self.secure is not None
        return {
            "bootstrap.servers": f"{self.host}:{self.secure_port}",
            "security.protocol": "SASL_SSL",
            "sasl.mechanisms": "SCRAM-SHA-512",
            "sasl.username": self.secure.username,
            "sasl.password": self.secure.password,
            "ssl.ca.location": str(self.secure.tls.ca),
        }

    def _advertised(self, listener: str, address: str) -> str:
        host = self.advertised_hosts.get(listener)
        return address if host is None else f"{host}:{address.rsplit(':', 1)[1]}"

    def _write_config(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "server.properties"
        plain, controller = f"{self.host}:{self.port}", f"{self.host}:{self.controller_port}"

        def bound(address: str) -> str:  # in a namespace of its own: on every address there
            return address if self.host_namespace is None else f"0.0.0.0:{address.split(':')[1]}"

        listeners = {"PLAINTEXT": plain}
        if self.secure is not None:
            listeners["SASL_SSL"] = f"{self.host}:{self.secure_port}"
        listeners |= self.extra_listeners
        protocols = dict.fromkeys(("PLAINTEXT", "CONTROLLER"), "PLAINTEXT")
        protocols |= dict.fromkeys(self.extra_listeners, "PLAINTEXT")
        if self.secure is not None:
            protocols["SASL_SSL"] = "SASL_SSL"
        replication = "1" if self.quorum is None else str(self.quorum.replication)
        in_sync = "1" if self.quorum is None else str(min(2, self.quorum.replication))
        quorum = (
            {"controller.quorum.bootstrap.servers": controller}
            if self.quorum is None
            else {
                "controller.quorum.voters": self.quorum.voters,
                "default.replication.factor": replication,
                "min.insync.replicas": in_sync,
            }
        )
        settings = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            **quorum,
            "listeners": ",".join(f"{k}://{bound(v)}" for k, v in listeners.items())
            + f",CONTROLLER://{bound(controller)}",
            "advertised.listeners": ",".join(
                f"{k}://{self._advertised(k, v)}" for k, v in listeners.items()
            ),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": ",".join(f"{k}:{v}" for k, v in protocols.items()),
            "group.coordinator.rebalance.protocols": self.group_protocols,
            # KIP-848 groups take their timing from the broker: the same as paystream's classic
            # groups ask for (a killed member's partitions move after 10 s, not the default 45).
            "group.consumer.min.session.timeout.ms": "6000",
            "group.consumer.session.timeout.ms": "10000",
            "group.consumer.min.heartbeat.interval.ms": "1000",
            "group.consumer.heartbeat.interval.ms": "1000",
            "log.dirs": str(self.data_dir / "logs"),
            "offsets.topic.replication.factor": replication,
            "offsets.topic.num.partitions": "5",
            "transaction.state.log.replication.factor": replication,
            "transaction.state.log.min.isr": in_sync,
            "share.coordinator.state.topic.replication.factor": replication,
            "share.coordinator.state.topic.min.isr": in_sync,
            "group.initial.rebalance.delay.ms": "0",
            "num.partitions": "3",
            "auto.create.topics.enable": "false",
            "message.max.bytes": "10485760",
        }
        if self.secure is not None:
            settings |= {
                "sasl.enabled.mechanisms": "SCRAM-SHA-512",
                "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": (
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                ),
                "listener.name.sasl_ssl.ssl.keystore.type": "PKCS12",
                "listener.name.sasl_ssl.ssl.keystore.location": str(self.secure.tls.keystore),
                "listener.name.sasl_ssl.ssl.keystore.password": self.secure.tls.keystore_password,
            }
        config.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
        (self.data_dir / "log4j2.yaml").write_text(_LOG4J2)
        return config

    def _java(self, libs: Path, main: str, *args: str) -> list[str]:
        java = require_tool(
            "java", "install a JDK 17 or newer (e.g. apt-get install openjdk-17-jdk-headless)"
        )
        return [
            java,
            "-Xms256m",
            "-Xmx768m",
            "-XX:+UseG1GC",
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.yaml'}",
            "-cp",
            f"{libs}/*",
            main,
            *args,
        ]

    def start(self, timeout_s: float = 90.0) -> None:
        self.launch()
        self.wait_ready(timeout_s)

    def launch(self) -> None:
        """Format the log directory (the first time) and start the process, without waiting: the
        nodes of a cluster start together, since none answers before the quorum has formed."""
        if self.host_namespace is None:
            ensure_port_free(
                self.host, self.port, "the Kafka broker", "stop what uses it or choose another port"
            )
        libs = kafka_jars(self.cache_dir)
        config = self._write_config()
        if not (self.data_dir / "logs" / "meta.properties").exists():
            cluster_id = (
                str(uuid.uuid4().hex[:22]) if self.quorum is None else self.quorum.cluster_id
            )
            standalone = ["--standalone"] if self.quorum is None else []
            result = subprocess.run(
                self._java(
                    libs,
                    "kafka.tools.StorageTool",
                    "format",
                    *standalone,
                    "-t",
                    cluster_id,
                    "-c",
                    str(config),
                    *self._scram_users(),
                ),
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise DevenvError(
                    f"Formatting Kafka storage failed:\n{result.stdout}{result.stderr}"
                )
        argv = self._java(libs, "kafka.Kafka", str(config))
        self._process = ChildProcess(
            f"kafka-{self.node_id}",
            argv if self.host_namespace is None else self.host_namespace.command(argv),
            self.data_dir / "broker.log",
        )

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        """Until the node answers metadata requests and coordinates groups."""
        assert self._process is not None, "launch() first"
        admin = AdminClient(
            {"bootstrap.servers": self.bootstrap, "socket.timeout.ms": 1000, "log_level": 0}
        )
        self._process.wait_until(
            lambda: self._answers_metadata(admin), timeout_s, "answering metadata requests"
        )
        # A new broker creates its group-offsets topic on the first group request and answers
        # NOT_COORDINATOR meanwhile, which librdkafka backs off from for 3 s: get that over with
        # here rather than in the first consumer's join.
        self._process.wait_until(self._coordinates_groups, timeout_s, "coordinating groups")

    def _scram_users(self) -> list[str]:
        if self.secure is None:
            return []
        user = self.secure
        return ["--add-scram", f"SCRAM-SHA-512=[name={user.username},password={user.password}]"]

    def _answers_metadata(self, admin: AdminClient) -> bool:
        # Ask librdkafka only once the port listens, and through one client: a metadata request
        # that timed out waiting for the broker to come up, on a client destroyed right after
        # (one a poll), tripped an assertion in librdkafka (rd_kafka_enq_once_del_source_return)
        # that aborts the whole process.
        try:
            socket.create_connection((self.host, self.port), timeout=1).close()
        except OSError:
            return False
        try:
            return bool(admin.list_topics(timeout=1).brokers)
        except KafkaException:
            return False

    def _coordinates_groups(self) -> bool:
        consumer = Consumer(
            {"bootstrap.servers": self.bootstrap, "group.id": "paystream-warmup", "log_level": 0}
        )
        try:
            consumer.committed([TopicPartition("paystream-warmup", 0)], timeout=1)
            return True
        except KafkaException:
            return False
        finally:
            consumer.close()

    def create_topics(self, names: list[str], partitions: int = 3) -> None:
        create_topics(self.bootstrap, names, partitions)

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop(timeout_s=30)
            self._process = None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "broker.log"


def create_topics(
    bootstrap: str,
    names: list[str],
    partitions: int = 3,
    replication: int = 1,
    replicas: list[int] | None = None,
) -> None:
    """Create topics (idempotent) and wait until each has a leader for every partition. With
    `replication` above 1, a write needs two replicas in sync (min.insync.replicas=2).
    `replicas`: the node ids holding every partition, its leader first (else the cluster
    spreads them)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=10).topics)
    config = {} if replication == 1 else {"min.insync.replicas": "2"}
    wanted = [
        NewTopic(name, num_partitions=partitions, replication_factor=replication, config=config)
        if replicas is None
        else NewTopic(
            name, partitions, -1, replica_assignment=[replicas] * partitions, config=config
        )
        for name in names
    ]
    missing = [t for t in wanted if t.topic not in existing]
    futures = admin.create_topics(missing) if missing else {}
    for name, future in futures.items():
        try:
            future.result(timeout=30)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise DevenvError(f"Could not create topic {name}: {exc}") from exc
    for _ in range(100):
        metadata = admin.list_topics(timeout=10).topics
        if all(
            name in metadata
            and metadata[name].partitions
            and all(p.leader >= 0 for p in metadata[name].partitions.values())
            for name in names
        ):
            return
        time.sleep(0.1)
    raise DevenvError(f"Topics {names} have no leaders after 10 s")


def delete_topics(bootstrap: str, names: list[str]) -> None:
    """Delete topics and wait until the cluster no longer lists them (so that they can be
    created again under the same names, as new logs with ids of their own)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for name, future in admin.delete_topics(names, operation_timeout=30).items():
        try:
            future.result(timeout=30)
        except KafkaException as exc:
            raise DevenvError(f"Could not delete topic {name}: {exc}") from exc
    for _ in range(300):
        if not set(names) & set(admin.list_topics(timeout=10).topics):
            return
        time.sleep(0.1)
    raise DevenvError(f"Topics {names} are still listed 30 s after their deletion")


class KafkaCluster:
    """`size` combined broker + controller nodes forming one cluster (a static quorum of every
    node), the internal topics replicated `size` times (at most 3) with two replicas in sync.
    Each node can be killed, stopped and started again on its own; clients bootstrap from all.

    With `isolatable`, a test host (its namespace created), the last node runs in that host's
    network namespace and can be cut off from the other nodes and every client at once, with a
    silent link (`isolate`); the others then serve on the broker's service address
    (network.add_service_addresses), which the namespace routes over the same link.
    """

    def __init__(
        self,
        data_dir: Path,
        cache_dir: Path,
        *,
        size: int = 3,
        host: str = "127.0.0.1",
        isolatable: network.TestHost | None = None,
    ):
        hosts = [host] * size
        if isolatable is not None:
            hosts = [network.SERVICE_ADDRESSES["broker"]] * (size - 1)
            hosts.append(isolatable.links["broker"].ns_address)
        self._isolatable = isolatable
        nodes = [
            KafkaBroker(
                data_dir / f"node-{i + 1}",
                cache_dir,
                host=hosts[i],
                node_id=i + 1,
                host_namespace=isolatable if isolatable is not None and i == size - 1 else None,
            )
            for i in range(size)
        ]
        quorum = Quorum(
            cluster_id=uuid.uuid4().hex[:22],
            voters=",".join(f"{n.node_id}@{n.host}:{n.controller_port}" for n in nodes),
            replication=min(size, 3),
        )
        for node in nodes:
            node.quorum = quorum
        self.nodes = nodes
        self._admin_client: AdminClient | None = None

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes)

    def node(self, node_id: int) -> KafkaBroker:
        return self.nodes[node_id - 1]

    def start(self, timeout_s: float = 120.0) -> None:
        for node in self.nodes:
            node.launch()
        for node in self.nodes:
            node.wait_ready(timeout_s)

    def restart(self, node_id: int, timeout_s: float = 120.0) -> None:
        """Start a killed or stopped node again, on its log directory and ports."""
        node = self.node(node_id)
        node.launch()
        node.wait_ready(timeout_s)

    def rolling_restart(
        self, topics: list[str], timeout_s: float = 120.0, nodes: int | None = None
    ) -> None:
        """As an operator upgrades a cluster: each node in turn (the first `nodes` of them, if
        given) stopped cleanly and started again, the next only once no replica of `topics` or
        of the group offsets is out of sync."""
        for node in self.nodes[:nodes]:
            node.stop()
            self.restart(node.node_id, timeout_s)
            self.wait_in_sync(topics, timeout_s)

    def wait_in_sync(self, topics: list[str], timeout_s: float = 120.0) -> None:
        """Until no replica of `topics` or of the group offsets is out of sync."""
        watched = [*topics, "__consumer_offsets"]
        polling.until(
            lambda: self.under_replicated(watched) == 0,
            timeout_s,
            "every replica in sync",
            every_s=0.2,
        )

    def stop(self) -> None:
        """Every node at once: stopped one after another, the last ones would wait out their
        timeout for a controller quorum that has already gone."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(KafkaBroker.stop, self.nodes))

    def create_topics(
        self, names: list[str], partitions: int = 3, leader: int | None = None
    ) -> None:
        """Topics replicated on every node (at most 3); `leader`: the node leading all their
        partitions, else the cluster spreads the leaders."""
        replication = min(len(self.nodes), 3)
        replicas = None
        if leader is not None:
            others = [n.node_id for n in self.nodes if n.node_id != leader]
            replicas = [leader, *others[: replication - 1]]
        create_topics(self.bootstrap, names, partitions, replication, replicas)

    @property
    def isolatable(self) -> int:
        """The node that `isolate` can cut off."""
        assert self._isolatable is not None, "a cluster made with `isolatable`"
        return self.nodes[-1].node_id

    def isolate(self) -> None:
        """Cut the isolatable node off from the other nodes and every client: each side's
        packets to the other vanish, with no reset, until `reconnect`."""
        assert self._isolatable is not None, "a cluster made with `isolatable`"
        self._isolatable.cut("broker")

    def reconnect(self) -> None:
        assert self._isolatable is not None, "a cluster made with `isolatable`"
        self._isolatable.heal("broker")

    @property
    def _admin(self) -> AdminClient:
        """One client for the cluster's questions, kept open: clients made and destroyed by the
        hundred while a node was down tripped an assertion in librdkafka that aborts the
        process (see KafkaBroker._answers_metadata)."""
        if self._admin_client is None:
            self._admin_client = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        return self._admin_client

    def coordinator(self, group_id: str) -> int:
        """The node coordinating a consumer group now, as the cluster says (-1: none known)."""
        [future] = self._admin.describe_consumer_groups([group_id], request_timeout=10).values()
        try:
            node = future.result().coordinator
        except KafkaException:
            return -1
        return -1 if node is None else int(node.id)

    def leader(self, topic: str, partition: int) -> int:
        """The node id leading a partition now (-1 while it has none, or no node answers)."""
        try:
            metadata = self._admin.list_topics(topic, timeout=10)
        except KafkaException:
            return -1
        return int(metadata.topics[topic].partitions[partition].leader)

    def under_replicated(self, topics: list[str]) -> int | None:
        """Partitions of these topics with fewer replicas in sync than assigned (None: no node
        answered)."""
        try:
            metadata = self._admin.list_topics(timeout=10).topics
        except KafkaException:
            return None
        return sum(
            len(p.isrs) < len(p.replicas)
            for name in topics
            if name in metadata
            for p in metadata[name].partitions.values()
        )

    def __enter__(self) -> KafkaCluster:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
