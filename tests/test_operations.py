"""Alerts and dashboards as code (deploy/): the rules parse and fire as their unit tests say, and
every metric a rule or a panel names is one the processor exports."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from paystream_tooling.devenv.gotools import PROMTOOL, go_tool
from paystream_tooling.devenv.processes import free_port
from paystream_tooling.devenv.stack import Stack
from tests.conftest import Env, SimulatorClient, async_wait_for, processor

DEPLOY = Path(__file__).parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "paystream.json"
_METRIC = re.compile(r"\bpaystream_[a-z0-9_]+")


def _rule_expressions() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def _panel_expressions() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def test_alert_rules_parse_and_fire_as_their_tests_say(stack: Stack) -> None:
    promtool = go_tool(stack.home.parent / "cache", PROMTOOL)
    for argv in (["check", "rules", RULES.name], ["test", "rules", "alerts_test.yml"]):
        result = subprocess.run(
            [str(promtool), *argv],
            cwd=RULES.parent,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_and_prometheus_are_wired_as_compose_mounts_them() -> None:
    compose = yaml.safe_load((DEPLOY.parent / "docker-compose.yml").read_text())["services"]
    for service in ("prometheus", "grafana"):
        for volume in compose[service]["volumes"]:
            source = volume.split(":")[0]
            assert (DEPLOY.parent / source).exists(), f"{service} mounts a missing {source}"
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    mounted = {v.split(":")[1] for v in compose["prometheus"]["volumes"]}
    assert set(prometheus["rule_files"]) <= mounted
    assert compose["processor"]["environment"]["PAYSTREAM_WEB_HOST"] == "0.0.0.0"
    datasources = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
    uid = yaml.safe_load(datasources.read_text())["datasources"][0]["uid"]
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert {p["datasource"]["uid"] for p in panels} == {uid}


def _exported(url: str) -> set[str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    families = list(text_string_to_metric_families(text))
    # A family declared with no series yet counts: paystream_partition_stalled_seconds has one
    # only while a partition is stalled.
    return {family.name for family in families} | {
        sample.name for family in families for sample in family.samples
    }


async def test_every_metric_named_is_one_the_processor_exports(
    env: Env, simulator: SimulatorClient
) -> None:
    """Run the processor on a hostile stream and read its /metrics: each name a rule or a panel
    uses is there (a histogram's _bucket, a counter's _total as exposed)."""
    named = {m for e in _rule_expressions() + _panel_expressions() for m in _METRIC.findall(e)}
    assert len(named) >= 10  # the regex finds the names, not nothing
    port = free_port()
    settings = env.settings(web_port=port)
    simulator.start(records=300, seed=5, profile="hostile")
    url = f"http://127.0.0.1:{port}/metrics"
    missing: set[str] = set()

    def all_exported() -> bool:
        nonlocal missing
        try:
            missing = named - _exported(url)
        except OSError:
            return False
        return not missing

    async with processor(settings, serve_web=True):
        try:
            await async_wait_for(all_exported, 60, "every named metric on /metrics")
        except AssertionError as exc:
            raise AssertionError(f"named but never exported: {sorted(missing)}") from exc
