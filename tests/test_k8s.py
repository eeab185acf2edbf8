"""k8s/: both overlays render with `kubectl kustomize`, validate against Kubernetes 1.37 (PyTorchJob against
the CRD shipped in k8s/crds/), follow the workload security rules, and pass checkov."""

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
K8S_VERSION = "1.37.0"
OVERLAYS = ("dev", "prod")
CRD = K8S / "crds" / "kubeflow.org_pytorchjobs.yaml"


def tool(*candidates: str) -> str:
    """Path of a CLI tool; missing tools fail the test unless ATMASK_ALLOW_MISSING_TOOLS=1."""
    for cand in candidates:
        local = ROOT / cand
        path = str(local) if local.is_file() else shutil.which(cand)
        if path:
            return path
    message = f"none of {candidates} found; run .ci/tools.sh"
    if os.environ.get("ATMASK_ALLOW_MISSING_TOOLS") == "1":
        pytest.skip(message)
    pytest.fail(message)


def render(target: Path) -> str:
    kubectl = tool(".tools/kubectl/bin/kubectl", "kubectl")
    result = subprocess.run([kubectl, "kustomize", str(target)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {o: [d for d in yaml.safe_load_all(render(K8S / "overlays" / o)) if d] for o in OVERLAYS}


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [doc["spec"]["template"]["spec"]]
    if doc["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    return []


# ------------------------------------------------------------------ PyTorchJob schema


def json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI v3 (CRD structural schema) -> JSON schema; unknown fields rejected as the API server's
    strict field validation does, except where the CRD preserves them."""
    node = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "format"}
    if "properties" in node:
        node["properties"] = {k: json_schema(v) for k, v in node["properties"].items()}
        node.setdefault("additionalProperties", False)
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = json_schema(node["additionalProperties"])
    if "items" in node:
        node["items"] = json_schema(node["items"])
    if "anyOf" in node:
        node["anyOf"] = [json_schema(s) for s in node["anyOf"]]
    return node


@pytest.fixture(scope="module")
def pytorchjob_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "PyTorchJob"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return json_schema(version["schema"]["openAPIV3Schema"])


def validate_pytorchjob(doc: dict[str, Any], schema: dict[str, Any]) -> None:
    """The CRD schema, then each replica's pod template as a core/v1 PodTemplate (strict)."""
    assert doc["apiVersion"] == "kubeflow.org/v1"
    jsonschema.validate(doc, schema)
    for name, replica in doc["spec"]["pytorchReplicaSpecs"].items():
        assert name in ("Master", "Worker")
        assert replica["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode")
        template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"{doc['metadata']['name']}-{name.lower()}", "namespace": "x"},
            "template": replica["template"],
        }
        kubernetes_validate.validate(template, K8S_VERSION, strict=True)


# ------------------------------------------------------------------ tests


def test_overlays_render_expected_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    base = {
        ("Namespace", None, "atmask"),
        ("Namespace", None, "atmask-pipelines"),
        ("ServiceAccount", "atmask", "mlflow"),
        ("Deployment", "atmask", "mlflow"),
        ("Service", "atmask", "mlflow"),
        ("NetworkPolicy", "atmask", "default-deny-ingress"),
        ("NetworkPolicy", "atmask", "mlflow-from-pipelines"),
        ("PersistentVolumeClaim", "atmask-pipelines", "atmask-datasets"),
        ("PersistentVolumeClaim", "atmask-pipelines", "atmask-runs"),
        ("ServiceAccount", "atmask-pipelines", "atmask-pipeline-runner"),
        ("Role", "atmask-pipelines", "atmask-pipeline-runner"),
        ("RoleBinding", "atmask-pipelines", "atmask-pipeline-runner"),
        ("PriorityClass", None, "atmask-gpu-training"),
        ("ResourceQuota", "atmask-pipelines", "atmask-gpu-quota"),
        ("LimitRange", "atmask-pipelines", "atmask-defaults"),
        ("PyTorchJob", "atmask-pipelines", "atmask-train-multinode"),
    }
    for overlay, docs in rendered.items():
        found = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs}
        extra = {("PodDisruptionBudget", "atmask", "mlflow")} if overlay == "prod" else set()
        assert found == base | extra
        for doc in docs:
            labels = doc["metadata"]["labels"]
            assert labels["app.kubernetes.io/part-of"] == "atmask"
            assert labels["atmask.io/environment"] == overlay
        assert not any(d["kind"] == "Secret" for d in docs), "secrets are referenced, never shipped"


def test_overlays_differ_where_intended(rendered: dict[str, list[dict[str, Any]]]) -> None:
    dev, prod = rendered["dev"], rendered["prod"]
    assert by_kind(dev, "Deployment")["mlflow"]["spec"]["replicas"] == 1
    assert by_kind(prod, "Deployment")["mlflow"]["spec"]["replicas"] == 2
    quota = {o: by_kind(rendered[o], "ResourceQuota")["atmask-gpu-quota"]["spec"]["hard"] for o in OVERLAYS}
    assert (quota["dev"]["requests.nvidia.com/gpu"], quota["prod"]["requests.nvidia.com/gpu"]) == ("2", "32")
    jobs = {o: by_kind(rendered[o], "PyTorchJob")["atmask-train-multinode"]["spec"] for o in OVERLAYS}
    assert jobs["dev"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert jobs["prod"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
    for overlay, job in jobs.items():
        gpus = "1" if overlay == "dev" else "8"
        for replica in job["pytorchReplicaSpecs"].values():
            container = replica["template"]["spec"]["containers"][0]
            assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
            assert container["args"][0] == f"--nproc-per-node={gpus}"
    assert by_kind(dev, "PersistentVolumeClaim")["atmask-datasets"]["spec"]["resources"]["requests"] == {
        "storage": "10Gi"
    }


def test_every_object_validates(
    rendered: dict[str, list[dict[str, Any]]], pytorchjob_schema: dict[str, Any]
) -> None:
    for docs in rendered.values():
        for doc in docs:
            if doc["kind"] == "PyTorchJob":
                validate_pytorchjob(doc, pytorchjob_schema)
            else:
                assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == "1.37"


def test_validators_reject_broken_objects(
    rendered: dict[str, list[dict[str, Any]]], pytorchjob_schema: dict[str, Any]
) -> None:
    job = by_kind(rendered["prod"], "PyTorchJob")["atmask-train-multinode"]
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "three"
    with pytest.raises(jsonschema.ValidationError, match="'three' is not of type 'integer'"):
        validate_pytorchjob(bad, pytorchjob_schema)
    bad = copy.deepcopy(job)
    bad["spec"]["runPolicy"]["cleanupPolicy"] = "All"  # typo of cleanPodPolicy
    with pytest.raises(jsonschema.ValidationError, match="cleanupPolicy"):
        validate_pytorchjob(bad, pytorchjob_schema)
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["gpus"] = 8
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_pytorchjob(bad, pytorchjob_schema)
    deployment = copy.deepcopy(by_kind(rendered["prod"], "Deployment")["mlflow"])
    deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = [2]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_workloads_are_locked_down(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for docs in rendered.values():
        workloads = [d for d in docs if pod_specs(d)]
        assert {d["kind"] for d in workloads} == {"Deployment", "PyTorchJob"}
        for doc in workloads:
            for spec in pod_specs(doc):
                assert spec["automountServiceAccountToken"] is False
                pod_sc = spec["securityContext"]
                assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] >= 10000
                assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
                for c in spec["containers"]:
                    sc = c["securityContext"]
                    assert sc["allowPrivilegeEscalation"] is False
                    assert sc["readOnlyRootFilesystem"] is True
                    assert sc["capabilities"] == {"drop": ["ALL"]}
                    for kind in ("requests", "limits"):
                        assert {"cpu", "memory"} <= set(c["resources"][kind])
                    repo, _, digest = c["image"].partition("@sha256:")
                    assert len(digest) == 64 and ":" not in repo.rsplit("/", 1)[-1], c["image"]
                    if doc["kind"] == "Deployment":
                        assert c["livenessProbe"]["httpGet"]["path"] == "/health"
                        assert c["readinessProbe"]["httpGet"]["path"] == "/health"
                    env = {e["name"]: e for e in c.get("env", [])}
                    for name, entry in env.items():
                        if any(w in name for w in ("PASSWORD", "SECRET", "ACCESS_KEY", "STORE_URI")):
                            assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], name


def test_mlflow_server_has_auth_postgres_and_s3_from_secrets(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for docs in rendered.values():
        spec = by_kind(docs, "Deployment")["mlflow"]["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        assert container["command"] == ["mlflow"]
        args = container["args"]
        assert args[0] == "server" and "--app-name=basic-auth" in args
        assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in args
        assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in args
        env = {e["name"]: e for e in container["env"]}
        for name in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION", "AWS_SECRET_ACCESS_KEY"):
            assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "atmask-mlflow-server"
        auth = {v["name"]: v for v in spec["volumes"]}["auth"]
        assert auth["secret"]["secretName"] == "atmask-mlflow-auth"
        assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].startswith("/etc/mlflow-auth/")


def test_only_the_pipeline_namespace_reaches_mlflow(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for docs in rendered.values():
        policies = by_kind(docs, "NetworkPolicy")
        deny = policies["default-deny-ingress"]["spec"]
        assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
        allow = policies["mlflow-from-pipelines"]["spec"]
        assert allow["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "mlflow"}
        assert allow["ingress"] == [
            {
                "from": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": "atmask-pipelines"}
                        }
                    }
                ],
                "ports": [{"protocol": "TCP", "port": 5000}],
            }
        ]
        labels = by_kind(docs, "Deployment")["mlflow"]["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "mlflow"


def test_pipeline_rbac_is_least_privilege(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for docs in rendered.values():
        assert not any(d["kind"] in ("ClusterRole", "ClusterRoleBinding") for d in docs)
        role = by_kind(docs, "Role")["atmask-pipeline-runner"]
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field]
            assert "secrets" not in rule["resources"]
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
        binding = by_kind(docs, "RoleBinding")["atmask-pipeline-runner"]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "atmask-pipeline-runner",
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "atmask-pipeline-runner", "namespace": "atmask-pipelines"}
        ]


def checkov_reports(args: list[str]) -> list[dict[str, Any]]:
    checkov = tool(".tools/checkov/bin/checkov", "checkov")
    cmd = [checkov, *args, "-o", "json", "--skip-download"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    reports = json.loads(result.stdout)
    return reports if isinstance(reports, list) else [reports]


def test_checkov_finds_nothing(tmp_path: Path, rendered: dict[str, list[dict[str, Any]]]) -> None:
    files = []
    for overlay in OVERLAYS:  # the rendered overlays, exactly as applied to a cluster
        (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(rendered[overlay]))
        files += ["-f", str(tmp_path / f"{overlay}.yaml")]
    reports = checkov_reports(["-d", str(K8S), "--framework", "kustomize"])
    reports += checkov_reports([*files, "--framework", "kubernetes"])
    assert [r["check_type"] for r in reports] == ["kustomize", "kubernetes"]
    for report in reports:
        failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
        assert failed == [], report["check_type"]
        assert report["summary"]["passed"] > 50
        for skipped in report["results"]["skipped_checks"]:
            assert (
                skipped["check_id"] == "CKV_K8S_35" and len(skipped["check_result"]["suppress_comment"]) > 30
            )
