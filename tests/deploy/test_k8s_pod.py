"""deploy/k8s pod templates: admitted under Pod Security "restricted", free of the service-link
variables the gateway would report as misspelt settings, and reaching the registry only
through LORAPLEX_DATABASE_URL (so a managed database needs nothing else changed)."""

from __future__ import annotations

import copy

import pytest
import yaml

from tests.deploy.test_k8s import DOCS, find

# https://kubernetes.io/docs/concepts/security/pod-security-standards/#restricted
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
RESTRICTED_SECCOMP = {"RuntimeDefault", "Localhost"}
WORKLOADS = [d for d in DOCS if d["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}]


def restricted_violations(pod: dict) -> list[str]:
    """What the Pod Security admission's "restricted" level refuses in a pod spec (the checks
    that apply to Linux pods)."""
    problems = [f"{key} is set" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    for volume in pod.get("volumes", []):
        kind = next(key for key in volume if key != "name")
        if kind not in RESTRICTED_VOLUMES:
            problems.append(f"volume {volume['name']} is a {kind}")
    pod_context = pod.get("securityContext", {})
    containers = pod["containers"] + pod.get("initContainers", [])
    for container in containers:
        name = container["name"]
        context = container.get("securityContext", {})
        if context.get("privileged"):
            problems.append(f"{name} is privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name} may escalate privileges")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{name} keeps capabilities")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name} adds capabilities")
        if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
            problems.append(f"{name} may run as root")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            problems.append(f"{name} runs as uid 0")
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {}))
        if seccomp.get("type") not in RESTRICTED_SECCOMP:
            problems.append(f"{name} has no RuntimeDefault/Localhost seccomp profile")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            problems.append(f"{name} uses a host port")
    return problems


@pytest.mark.parametrize(
    "workload", WORKLOADS, ids=[f"{d['kind']}/{d['metadata']['name']}" for d in WORKLOADS]
)
def test_pods_are_admitted_under_pod_security_restricted(workload):
    assert restricted_violations(workload["spec"]["template"]["spec"]) == []


def _without_pod_seccomp(pod: dict) -> None:
    pod["securityContext"].pop("seccompProfile", None)


def _with_root_init_container(pod: dict) -> None:
    pod["initContainers"] = [{"name": "wait", "image": "postgres:16"}]


def _with_escalating_container(pod: dict) -> None:
    pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True


def _with_host_path(pod: dict) -> None:
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})


@pytest.mark.parametrize(
    "breakage",
    [_without_pod_seccomp, _with_root_init_container, _with_escalating_container, _with_host_path],
)
def test_the_restricted_check_catches_mistakes(breakage):
    pod = copy.deepcopy(find("Deployment", "loraplex-gateway")["spec"]["template"]["spec"])
    breakage(pod)
    assert restricted_violations(pod)


def service_link_names(service: dict) -> list[str]:
    """The variables the kubelet puts into every pod of the namespace for a Service with a
    cluster IP (Docker links style), unless the pod sets enableServiceLinks: false."""
    prefix = service["metadata"]["name"].upper().replace("-", "_")
    names = [f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT", f"{prefix}_PORT"]
    for port in service["spec"]["ports"]:
        if "name" in port:
            names.append(f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}")
        tcp = f"{prefix}_PORT_{port['port']}_{port.get('protocol', 'TCP')}"
        names += [tcp, f"{tcp}_PROTO", f"{tcp}_PORT", f"{tcp}_ADDR"]
    return names


def test_the_gateway_pod_gets_no_service_link_variables():
    """The Service loraplex-gateway links as LORAPLEX_GATEWAY_*: eight unknown settings that
    the gateway warned about at every start."""
    from gateway.settings import unknown_environment

    linked = [
        name
        for service in DOCS
        if service["kind"] == "Service" and service["spec"].get("clusterIP") != "None"
        for name in service_link_names(service)
    ]
    assert len(unknown_environment(linked)) == 8  # why links must be off
    pod = find("Deployment", "loraplex-gateway")["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False


def test_the_gateway_finds_the_registry_only_through_the_database_url():
    """A managed database is chosen by LORAPLEX_DATABASE_URL alone: nothing in the pod may wait
    for, or talk to, the in-cluster PostgreSQL by its Service name (an init container that did
    kept the pod in Init forever)."""
    service = find("Service", "loraplex-postgres")["metadata"]["name"]
    url = find("Secret", "loraplex-secrets")["stringData"]["LORAPLEX_DATABASE_URL"]
    assert f"@{service}:" in url
    pod = find("Deployment", "loraplex-gateway")["spec"]["template"]["spec"]
    assert service not in yaml.safe_dump(pod)
