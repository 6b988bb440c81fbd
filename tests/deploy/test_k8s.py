"""deploy/k8s: every manifest validates offline against the Kubernetes schemas (strict: unknown
fields fail), the ServiceMonitor against a minimal schema of its CRD, and the resources refer
to each other correctly (names, labels, ports, the registry's credentials)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from jsonschema import Draft202012Validator

from tests.deploy.conftest import run, settings_env_names
from tests.deploy.demo_base import demo_max_position_embeddings
from tests.deploy.promql import DEPLOY

K8S = DEPLOY / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
NAMESPACE = "loraplex"
GATEWAY_UID = 10001  # USER of deploy/docker/Dockerfile.*
# What start-up does before LORAPLEX_ENGINE_START_TIMEOUT_S starts counting (migrations, a
# sha256 of every weight file of the base, the demo's build), while nothing listens yet.
STARTUP_MARGIN_S = 600

# The part of monitoring.coreos.com/v1 ServiceMonitor these manifests use: kubernetes-validate
# knows only built-in kinds, and the Operator's CRD schema is not available offline.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        },
                        "matchExpressions": {"type": "array"},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "honorLabels": {"type": "boolean"},
                            # SafeAuthorization: a bearer credential from a Secret in the
                            # ServiceMonitor's namespace
                            "authorization": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "type": {"type": "string"},
                                    "credentials": {
                                        "type": "object",
                                        "required": ["key"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "name": {"type": "string"},
                                            "key": {"type": "string"},
                                            "optional": {"type": "boolean"},
                                        },
                                    },
                                },
                            },
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                        },
                    },
                },
            },
        },
    },
}


def manifests() -> list[Path]:
    return sorted(path for path in K8S.glob("*.yaml") if path != KUSTOMIZATION)


def documents() -> list[dict]:
    return [doc for path in manifests() for doc in yaml.safe_load_all(path.read_text()) if doc]


DOCS = documents()


def find(kind: str, name: str) -> dict:
    matches = [d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def validate(doc: dict) -> None:
    """Raises on a schema violation (kubernetes_validate.ValidationError or jsonschema's)."""
    if doc["kind"] == "ServiceMonitor":
        Draft202012Validator(SERVICE_MONITOR_SCHEMA).validate(doc)
    else:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("doc", DOCS, ids=[f"{d['kind']}/{d['metadata']['name']}" for d in DOCS])
def test_manifest_matches_its_schema(doc):
    validate(doc)
    assert doc["metadata"].get("namespace", NAMESPACE) == NAMESPACE


@pytest.mark.parametrize(
    ("kind", "name", "path", "bad"),
    [
        ("Deployment", "loraplex-gateway", ("spec",), {"replica": 1}),  # a typo (strict)
        ("Deployment", "loraplex-gateway", ("spec",), {"replicas": "one"}),
        ("Service", "loraplex-gateway", ("spec",), {"ports": [{"port": "http"}]}),
        ("ServiceMonitor", "loraplex-gateway", ("spec",), {"endpoint": []}),
        ("ServiceMonitor", "loraplex-gateway", ("spec", "endpoints", 0), {"interval": "15"}),
    ],
)
def test_validation_catches_mistakes(kind, name, path, bad):
    doc = copy.deepcopy(find(kind, name))
    node = doc
    for key in path:
        node = node[key]
    node.update(bad)
    with pytest.raises(Exception) as raised:
        validate(doc)
    assert "Validation" in type(raised.value).__name__


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert kustomization["namespace"] == NAMESPACE
    assert sorted(kustomization["resources"]) == sorted(path.name for path in manifests())


def test_kustomize_build_validates():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl here: the per-file validation above stands in for the build")
    result = run(kubectl, "kustomize", str(K8S))
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert len(built) == len(DOCS)
    for doc in built:
        validate(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE


@pytest.fixture(scope="module")
def deployment() -> dict:
    return find("Deployment", "loraplex-gateway")


def gateway_container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_gateway_holds_one_gpu_and_one_replica(deployment):
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"
    resources = gateway_container(deployment)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["memory"] and resources["limits"]["memory"]


def test_gateway_probes(deployment):
    container = gateway_container(deployment)
    port = find("ConfigMap", "loraplex-config")["data"]["LORAPLEX_PORT"]
    (http,) = container["ports"]
    assert http["containerPort"] == int(port)
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/healthz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in {http["name"], http["containerPort"]}
    # The engine may take LORAPLEX_ENGINE_START_TIMEOUT_S to start, after the rest of
    # start-up: the kubelet must wait that long before liveness can kill the pod.
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    timeout = float(find("ConfigMap", "loraplex-config")["data"]["LORAPLEX_ENGINE_START_TIMEOUT_S"])
    assert budget >= timeout + STARTUP_MARGIN_S


def test_gateway_runs_as_the_image_user(deployment):
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == GATEWAY_UID
    assert pod["securityContext"]["fsGroup"] == GATEWAY_UID
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.cuda"):
        assert f"USER {GATEWAY_UID}:{GATEWAY_UID}" in (DEPLOY / "docker" / dockerfile).read_text()


def test_gateway_references_resolve(deployment):
    container = gateway_container(deployment)
    for source in container["envFrom"]:
        if "configMapRef" in source:
            find("ConfigMap", source["configMapRef"]["name"])
        else:
            find("Secret", source["secretRef"]["name"])
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if claim := volume.get("persistentVolumeClaim"):
            find("PersistentVolumeClaim", claim["claimName"])
    data_dir = find("ConfigMap", "loraplex-config")["data"]["LORAPLEX_DATA_DIR"]
    mounted = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert "persistentVolumeClaim" in volumes[mounted[data_dir]], "data dir is persistent"


def test_service_and_servicemonitor_select_the_gateway(deployment):
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = find("Service", "loraplex-gateway")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == gateway_container(deployment)["ports"][0]["name"]
    monitor = find("ServiceMonitor", "loraplex-gateway")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["namespaceSelector"]["matchNames"] == [NAMESPACE]
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    credentials = endpoint["authorization"]["credentials"]
    secret = find("Secret", credentials["name"])
    assert secret["metadata"]["namespace"] == NAMESPACE  # the Operator reads it from there
    assert (
        credentials["key"] == "LORAPLEX_METRICS_TOKEN" and secret["stringData"][credentials["key"]]
    )
    env_from = [
        s["secretRef"]["name"] for s in gateway_container(deployment)["envFrom"] if "secretRef" in s
    ]
    assert credentials["name"] in env_from  # the gateway reads the same token
    # The job label of a ServiceMonitor target is the Service's name: alerts.yml matches it.
    assert (
        f'job="{service["metadata"]["name"]}"' in (DEPLOY / "prometheus" / "alerts.yml").read_text()
    )


def test_registry_credentials_agree():
    database = find("Secret", "loraplex-postgres")["stringData"]
    url = urlsplit(find("Secret", "loraplex-secrets")["stringData"]["LORAPLEX_DATABASE_URL"])
    service = find("Service", "loraplex-postgres")
    statefulset = find("StatefulSet", "loraplex-postgres")
    assert url.scheme == "postgresql+asyncpg"
    assert url.hostname == service["metadata"]["name"]
    assert url.port == service["spec"]["ports"][0]["port"]
    assert (url.username, url.password) == (
        database["POSTGRES_USER"],
        database["POSTGRES_PASSWORD"],
    )
    assert url.path == f"/{database['POSTGRES_DB']}"
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert statefulset["spec"]["volumeClaimTemplates"]


def test_limits_store_credentials_agree():
    password = find("Secret", "loraplex-redis")["stringData"]["REDIS_PASSWORD"]
    url = urlsplit(find("Secret", "loraplex-secrets")["stringData"]["LORAPLEX_LIMITS_REDIS_URL"])
    service = find("Service", "loraplex-redis")
    redis = find("Deployment", "loraplex-redis")
    assert url.scheme == "redis" and url.password == password
    assert url.hostname == service["metadata"]["name"]
    assert url.port == service["spec"]["ports"][0]["port"]
    assert service["spec"]["clusterIP"] == "None"
    pod = redis["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert args[args.index("--save") + 1] == ""
    names = {env["name"] for env in container["env"]}
    assert {"REDIS_PASSWORD", "REDISCLI_AUTH"} <= names  # the probes authenticate too


def test_settings_are_ones_the_gateway_reads(monkeypatch):
    from gateway.settings import Settings

    config = find("ConfigMap", "loraplex-config")["data"]
    secret = find("Secret", "loraplex-secrets")["stringData"]
    assert set(config) | set(secret) <= settings_env_names()
    for name, value in {**config, **secret}.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.host == "0.0.0.0" and settings.port == 8000
    assert settings.admin_token is not None


def test_gateway_down_also_watches_the_annotation_scraped_pod(deployment):
    """Without the Operator, the pod is found by its prometheus.io/* annotations under the scrape
    config's own job (kubernetes-pods): the alert knows it by its labels, as labelmap writes
    them (`app.kubernetes.io/name` → `app_kubernetes_io_name`)."""
    template = deployment["spec"]["template"]["metadata"]
    assert template["annotations"]["prometheus.io/scrape"] == "true"
    labels = template["labels"]
    matchers = ", ".join(
        f'{name.replace(".", "_").replace("/", "_")}="{labels[name]}"'
        for name in ("app.kubernetes.io/name", "app.kubernetes.io/component")
    )
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    (gateway_down,) = [
        r for g in rules for r in g["rules"] if r.get("alert") == "LoraplexGatewayDown"
    ]
    assert f"up{{{matchers}}}" in gateway_down["expr"]
    assert f"absent(up{{{matchers}}})" in gateway_down["expr"]


def test_demo_mode_imports_no_adapter_folder(monkeypatch):
    """Demo mode's key is a well-known secret (secret.yaml): the ConfigMap must not import the
    models volume's adapters beside the demo's, where that key would reach them."""
    from gateway.settings import Settings

    config = find("ConfigMap", "loraplex-config")["data"]
    for name in settings_env_names():
        monkeypatch.delenv(name, raising=False)
    for name, value in config.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    if settings.demo:
        assert "LORAPLEX_ADAPTER_DIR" not in config
        assert settings.resolved_import_tenant() == "demo"
        assert settings.resolved_adapter_dir() == settings.demo_root / "adapters"


def test_the_demo_context_fits_the_demo_base(monkeypatch, tmp_path):
    """vLLM refuses a max_model_len above the base's max_position_embeddings: the ConfigMap's
    demo pod crash-looped with 8192 against the demo base's 4096."""
    from gateway.settings import Settings

    config = find("ConfigMap", "loraplex-config")["data"]
    for name in settings_env_names():
        monkeypatch.delenv(name, raising=False)
    for name, value in config.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.demo and settings.base_model is None, "the ConfigMap serves the demo"
    assert settings.max_model_len <= demo_max_position_embeddings(tmp_path / "base")


def test_the_pods_grace_period_covers_the_gateways_drain_and_grace(deployment):
    """SIGTERM: readiness goes 503 for the drain, then in-flight requests get the grace; the
    kubelet's SIGKILL must come after both."""
    from gateway.settings import Settings

    data = find("ConfigMap", "loraplex-config")["data"]
    settings = Settings(
        **{
            name: data[f"LORAPLEX_{name.upper()}"]
            for name in ("shutdown_drain_s", "shutdown_grace_s")
            if f"LORAPLEX_{name.upper()}" in data
        }
    )
    pod = deployment["spec"]["template"]["spec"]
    shutdown = settings.shutdown_drain_s + settings.shutdown_grace_s
    assert pod["terminationGracePeriodSeconds"] > shutdown
