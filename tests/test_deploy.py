"""The docker-compose deployment, checked without a Docker engine: every command, port,
volume, file and health check it names exists and agrees with the code.

tests/test_compose_e2e.py runs the same topology as plain processes."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from urllib.parse import urlparse

import pytest
import yaml

from cvserve.app.cli import parser
from cvserve.app.settings import Settings

from .conftest import REPO_ROOT

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PROMETHEUS = yaml.safe_load((REPO_ROOT / "docker" / "prometheus.yml").read_text())
DASHBOARD = json.loads((REPO_ROOT / "docker/grafana/dashboards/cvserve.json").read_text())
CVSERVE = ("api", "worker", "worker-cpu")
HEAVY = {"torch", "torchvision", "onnxruntime", "onnxruntime-gpu", "onnx",
         "opencv-python-headless", "pycocotools", "numpy"}


def dockerfile(service: str) -> list[tuple[str, str]]:
    """(instruction, arguments) of the service's Dockerfile, continuation lines joined."""
    build = SERVICES[service]["build"]
    assert build["context"] == "."
    text = (REPO_ROOT / build["dockerfile"]).read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def env(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in SERVICES[service].get("environment", {}).items()}


def health_url(service: str) -> str:
    test = SERVICES[service]["healthcheck"]["test"]
    found = re.search(r"https?://[^'\"]+", " ".join(test))
    assert found, f"{service}'s health check requests no URL: {test}"
    return found.group(0)


def test_every_service_builds_from_files_in_the_repository() -> None:
    for service in CVSERVE:
        for instruction, args in dockerfile(service):
            if instruction == "COPY" and not args.startswith("--from"):
                *sources, _ = shlex.split(args)
                for source in sources:
                    assert (REPO_ROOT / source).exists(), f"{service}: COPY {source} is missing"
    # What the images leave out must not be what they copy in.
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert not {"app", "worker", "models", "pyproject.toml", "README.md"} & set(ignored)


def test_commands_are_real_cvserve_commands() -> None:
    for service in CVSERVE:
        command = SERVICES[service]["command"]
        assert command[0] == "cvserve"
        args = parser().parse_args(command[1:])  # exits (fails the test) when it is not
        assert args.command in ("api", "worker")
        cmd = [a for i, a in dockerfile(service) if i == "CMD"][-1]
        assert json.loads(cmd) == command, f"{service}: the image's CMD and compose disagree"


def test_environment_names_real_settings() -> None:
    fields = {f"CVSERVE_{name.upper()}" for name in Settings.model_fields}
    for service in CVSERVE:
        names = set(env(service))
        for instruction, args in dockerfile(service):
            if instruction == "ENV":
                names |= {kv.split("=", 1)[0] for kv in shlex.split(args)}
        unknown = {n for n in names if n.startswith("CVSERVE_")} - fields
        assert not unknown, f"{service} sets variables no setting reads: {unknown}"
        assert urlparse(env(service)["CVSERVE_REDIS_URL"]).hostname == "redis"
    assert "redis" in SERVICES and "redis-cli" in SERVICES["redis"]["healthcheck"]["test"]


def test_ports_and_health_checks_point_at_real_endpoints() -> None:
    from cvserve.app.api import create_app
    from cvserve.app.queue import MemoryQueue

    routes = {getattr(r, "path", None) for r in create_app(Settings(), MemoryQueue(1, 1)).routes}
    api_port, grpc_port = env("api")["CVSERVE_PORT"], env("api")["CVSERVE_GRPC_PORT"]
    assert SERVICES["api"]["ports"] == [f"{api_port}:{api_port}", f"{grpc_port}:{grpc_port}"]
    url = urlparse(health_url("api"))
    assert str(url.port) == api_port and url.path in routes
    for service in ("worker", "worker-cpu"):
        port = env(service)["CVSERVE_WORKER_METRICS_PORT"]
        url = urlparse(health_url(service))
        assert str(url.port) == port and url.path == "/metrics"
        # The worker's metrics listen beyond loopback, so Prometheus reaches them.
        assert env(service)["CVSERVE_HOST"] == "0.0.0.0"
        assert [a for i, a in dockerfile(service) if i == "EXPOSE"] == [port]
    assert [a for i, a in dockerfile("api") if i == "EXPOSE"] == [f"{api_port} {grpc_port}"]
    for service, spec in SERVICES.items():
        for dep in spec.get("depends_on", {}):
            assert dep in SERVICES, f"{service} depends on a service that does not exist"
            if isinstance(spec["depends_on"], dict):
                condition = spec["depends_on"][dep]["condition"]
                assert condition != "service_healthy" or "healthcheck" in SERVICES[dep]


def test_volumes_exist() -> None:
    for service, spec in SERVICES.items():
        for volume in spec.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (REPO_ROOT / source).exists(), f"{service} mounts missing {source}"
            else:
                assert source in COMPOSE["volumes"], f"{service}: volume {source} undeclared"
    for service in ("worker", "worker-cpu"):
        assert "models:/models" in SERVICES[service]["volumes"]
        assert env(service)["CVSERVE_MODEL_REPOSITORY"] == "/models"


def test_one_worker_per_profile_gpu_by_default() -> None:
    assert SERVICES["worker"]["profiles"] == ["gpu"]
    assert SERVICES["worker-cpu"]["profiles"] == ["cpu"]
    assert all("profiles" not in spec for name, spec in SERVICES.items()
               if name not in ("worker", "worker-cpu"))
    # `docker compose up` means the GPU worker; `--profile cpu` replaces the setting.
    dotenv = dict(ln.split("=", 1) for ln in (REPO_ROOT / ".env").read_text().splitlines()
                  if ln and not ln.startswith("#"))
    assert dotenv["COMPOSE_PROFILES"] == "gpu"
    devices = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "deploy" not in SERVICES["worker-cpu"]
    assert env("worker-cpu").get("CVSERVE_DEVICE", "cpu") == "cpu"
    assert "nvidia/cuda" in [a for i, a in dockerfile("worker") if i == "FROM"][0]
    assert "onnxruntime-gpu" in " ".join(a for i, a in dockerfile("worker") if i == "RUN")


def test_prometheus_scrapes_every_cvserve_service_on_its_port() -> None:
    targets = {}
    for job in PROMETHEUS["scrape_configs"]:
        for sd in job["dns_sd_configs"]:
            for name in sd["names"]:
                targets[name] = (job["job_name"], sd["port"])
    assert targets["api"] == ("cvserve-api", int(env("api")["CVSERVE_PORT"]))
    for service in ("worker", "worker-cpu"):
        assert targets[service] == ("cvserve-worker",
                                    int(env(service)["CVSERVE_WORKER_METRICS_PORT"]))
    mount = "./docker/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
    assert mount in SERVICES["prometheus"]["volumes"]


def test_grafana_provisioning_finds_the_datasource_and_dashboard() -> None:
    mounts = dict(v.split(":")[:2] for v in SERVICES["grafana"]["volumes"])
    provisioning = REPO_ROOT / "docker/grafana/provisioning"
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    source = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())
    ds = source["datasources"][0]
    assert urlparse(ds["url"]).hostname == "prometheus"
    assert f":{urlparse(ds['url']).port}" in SERVICES["prometheus"]["ports"][0]
    provider = yaml.safe_load((provisioning / "dashboards/cvserve.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert mounts["./docker/grafana/dashboards"] == path
    uids = {t["datasource"]["uid"] for p in DASHBOARD["panels"] for t in p.get("targets", [])}
    assert uids == {ds["uid"]}


def test_api_image_installs_the_api_half_of_the_dependencies() -> None:
    def name(req: str) -> str:
        return re.split(r"[\[<>=!~ ]", req, maxsplit=1)[0].lower()

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pinned = {name(r): r for r in project["dependencies"]}
    wanted = [ln.strip() for ln in (REPO_ROOT / "docker/requirements-api.txt").read_text()
              .splitlines() if ln.strip() and not ln.startswith("#")]
    for req in wanted:
        assert pinned.get(name(req)) == req, f"{req} differs from pyproject.toml"
    assert not HEAVY & {name(r) for r in wanted}
    runs = " ".join(a for i, a in dockerfile("api") if i == "RUN")
    assert "--no-deps ." in runs and "requirements-api.txt" in runs


@pytest.mark.parametrize("service", CVSERVE)
def test_graceful_stop_fits_the_grace_period(service: str) -> None:
    seconds = int(SERVICES[service]["stop_grace_period"].rstrip("s"))
    if service == "api":
        assert seconds > Settings().shutdown_grace_s
    else:
        assert seconds >= 30
