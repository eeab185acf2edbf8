"""k8s/: the infrastructure overlays (k8s/overlays/{dev,prod}) and the training overlays
(k8s/overlays/{dev,prod}/training) render with `kubectl kustomize`, validate against Kubernetes 1.37
(PyTorchJob against the CRD shipped in k8s/crds/), follow the workload security rules, and pass checkov.
Applying the infrastructure starts no training; each training overlay is the one PyTorchJob."""

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
import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
K8S_VERSION = "1.37.0"
# environments: infrastructure in k8s/overlays/<env>, training in k8s/overlays/<env>/training
OVERLAYS = ("dev", "prod")
TARGETS = (*OVERLAYS, *(f"{o}/training" for o in OVERLAYS))
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
    """Every render, keyed by its path under k8s/overlays: "dev", "prod" (infrastructure, `kubectl apply -k`)
    and "dev/training", "prod/training" (the PyTorchJob, `kubectl create -k`)."""
    return {t: [d for d in yaml.safe_load_all(render(K8S / "overlays" / t)) if d] for t in TARGETS}


@pytest.fixture(scope="module")
def infra(rendered: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    return {o: rendered[o] for o in OVERLAYS}


@pytest.fixture(scope="module")
def training(rendered: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    return {o: rendered[f"{o}/training"] for o in OVERLAYS}


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [doc["spec"]["template"]["spec"]]
    if doc["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    return []


def containers_anywhere(node: Any) -> list[dict[str, Any]]:
    """Every container of every pod template in ``node``, whatever the kind (CRDs included)."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found += [c for c in value if isinstance(c, dict)]
            else:
                found += containers_anywhere(value)
    elif isinstance(node, list):
        for item in node:
            found += containers_anywhere(item)
    return found


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
    infra = {
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
    }
    job = {("PyTorchJob", "atmask-pipelines", "atmask-train-multinode")}
    assert set(rendered) == set(TARGETS)
    for target, docs in rendered.items():
        env, _, part = target.partition("/")
        found = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs}
        if part == "training":
            assert found == job
        else:
            extra = {("PodDisruptionBudget", "atmask", "mlflow")} if env == "prod" else set()
            assert found == infra | extra
        for doc in docs:
            labels = doc["metadata"]["labels"]
            assert labels["app.kubernetes.io/part-of"] == "atmask"
            assert labels["atmask.io/environment"] == env
        assert not any(d["kind"] == "Secret" for d in docs), "secrets are referenced, never shipped"


def test_applying_infrastructure_starts_no_training(
    infra: dict[str, list[dict[str, Any]]], training: dict[str, list[dict[str, Any]]]
) -> None:
    """`kubectl apply -k k8s/overlays/<env>` creates no training job and reserves no GPU; the job comes only
    from `kubectl create -k k8s/overlays/<env>/training`, which is exactly that one PyTorchJob."""
    for env, docs in infra.items():
        assert not [
            d for d in docs if d["kind"] == "PyTorchJob" or d["apiVersion"].startswith("kubeflow.org/")
        ]
        for container in containers_anywhere(docs):
            for kind in ("requests", "limits"):
                assert "nvidia.com/gpu" not in container.get("resources", {}).get(kind, {}), (env, container)
    for env, docs in training.items():
        (job,) = docs
        assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
        assert job["metadata"]["name"] == "atmask-train-multinode"
        assert job["metadata"]["namespace"] == "atmask-pipelines"
        assert job["metadata"]["labels"] == {
            "app.kubernetes.io/part-of": "atmask",
            "atmask.io/environment": env,
        }
        gpus = [c["resources"]["limits"]["nvidia.com/gpu"] for c in containers_anywhere(job)]
        assert gpus and all(int(g) >= 1 for g in gpus)


def test_overlays_differ_where_intended(
    infra: dict[str, list[dict[str, Any]]], training: dict[str, list[dict[str, Any]]]
) -> None:
    dev, prod = infra["dev"], infra["prod"]
    assert by_kind(dev, "Deployment")["mlflow"]["spec"]["replicas"] == 1
    assert by_kind(prod, "Deployment")["mlflow"]["spec"]["replicas"] == 2
    quota = {o: by_kind(infra[o], "ResourceQuota")["atmask-gpu-quota"]["spec"]["hard"] for o in OVERLAYS}
    assert (quota["dev"]["requests.nvidia.com/gpu"], quota["prod"]["requests.nvidia.com/gpu"]) == ("2", "32")
    jobs = {o: by_kind(training[o], "PyTorchJob")["atmask-train-multinode"]["spec"] for o in OVERLAYS}
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
    job = by_kind(rendered["prod/training"], "PyTorchJob")["atmask-train-multinode"]
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
    workloads = [d for docs in rendered.values() for d in docs if pod_specs(d)]
    assert {d["kind"] for d in workloads} == {"Deployment", "PyTorchJob"}
    assert sum(len(containers_anywhere(d)) for docs in rendered.values() for d in docs) == sum(
        len(spec["containers"]) + len(spec.get("initContainers", []))
        for d in workloads
        for spec in pod_specs(d)
    ), "a workload kind that pod_specs does not know"
    for docs in rendered.values():
        for doc in (d for d in docs if pod_specs(d)):
            for spec in pod_specs(doc):
                assert spec["automountServiceAccountToken"] is False
                pod_sc = spec["securityContext"]
                assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] >= 10000
                assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
                for c in spec.get("initContainers", []) + spec["containers"]:
                    sc = c["securityContext"]
                    assert sc["allowPrivilegeEscalation"] is False
                    assert sc["readOnlyRootFilesystem"] is True
                    assert sc["capabilities"] == {"drop": ["ALL"]}
                    for kind in ("requests", "limits"):
                        assert {"cpu", "memory"} <= set(c["resources"][kind])
                    repo, _, digest = c["image"].partition("@sha256:")
                    assert len(digest) == 64 and ":" not in repo.rsplit("/", 1)[-1], c["image"]
                    if doc["kind"] == "Deployment" and c in spec["containers"]:
                        assert c["livenessProbe"]["httpGet"]["path"] == "/health"
                        assert c["readinessProbe"]["httpGet"]["path"] == "/health"
                    env = {e["name"]: e for e in c.get("env", [])}
                    for name, entry in env.items():
                        if any(w in name for w in ("PASSWORD", "SECRET", "ACCESS_KEY", "STORE_URI")):
                            assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], name


def test_training_job_gets_mlflow_and_optional_s3_credentials_from_secrets(
    training: dict[str, list[dict[str, Any]]],
) -> None:
    for docs in training.values():
        (job,) = docs
        for replica in job["spec"]["pytorchReplicaSpecs"].values():
            (container,) = replica["template"]["spec"]["containers"]
            refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
            assert refs == {
                **{
                    k: {"name": "atmask-mlflow-client", "key": k}
                    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
                },
                **{
                    k: {"name": "atmask-s3", "key": k, "optional": True}
                    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
                },
            }


def test_mlflow_server_has_auth_postgres_and_s3_from_secrets(
    infra: dict[str, list[dict[str, Any]]],
) -> None:
    for docs in infra.values():
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


def test_only_the_pipeline_namespace_reaches_mlflow(infra: dict[str, list[dict[str, Any]]]) -> None:
    for docs in infra.values():
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


def test_pipeline_rbac_is_least_privilege(
    rendered: dict[str, list[dict[str, Any]]], infra: dict[str, list[dict[str, Any]]]
) -> None:
    for docs in rendered.values():
        assert not any(d["kind"] in ("ClusterRole", "ClusterRoleBinding") for d in docs)
    for docs in infra.values():
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
    try:
        reports = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(
            f"checkov {args} exited {result.returncode} without a JSON report:\n{result.stderr[-3000:]}"
        )
    return reports if isinstance(reports, list) else [reports]


def test_checkov_finds_nothing(tmp_path: Path, rendered: dict[str, list[dict[str, Any]]]) -> None:
    files = []
    for target in TARGETS:  # the rendered overlays, exactly as applied to (or created in) a cluster
        out = tmp_path / f"{target.replace('/', '-')}.yaml"
        out.write_text(yaml.safe_dump_all(rendered[target]))
        files += ["-f", str(out)]
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


# ------------------------------------------------------------------ MLflow --allowed-hosts, for real


def allowed_hosts_arg(docs: list[dict[str, Any]]) -> str:
    (container,) = by_kind(docs, "Deployment")["mlflow"]["spec"]["template"]["spec"]["containers"]
    (arg,) = [a for a in container["args"] if a.startswith("--allowed-hosts=")]
    return arg


@pytest.mark.integration
def test_mlflow_allowed_hosts_accept_in_cluster_names_and_refuse_others(
    tmp_path: Path, infra: dict[str, list[dict[str, Any]]]
) -> None:
    """MLflow compares the raw Host header, port included: a real `mlflow server` started with the
    rendered prod --allowed-hosts answers the service names clients use (with :5000) and refuses others."""
    from fixtures_services import _bin, _serve, free_port

    arg = allowed_hosts_arg(infra["prod"])
    assert allowed_hosts_arg(infra["dev"]) == arg
    port = free_port()
    cmd = [
        _bin("mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--artifacts-destination",
        str(tmp_path / "artifacts"),
        "--workers",
        "1",
        arg,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_SERVER_")}
    url = f"http://127.0.0.1:{port}"
    with _serve(cmd, f"{url}/health", tmp_path / "server.log", env):

        def status(host: str) -> int:
            search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
            return requests.get(search, headers={"Host": host}, timeout=30).status_code

        for host in (
            "mlflow.atmask.svc:5000",
            "mlflow.atmask.svc.cluster.local:5000",
            "mlflow:5000",
            "localhost:5000",
        ):
            assert status(host) == 200, host
        refused = status("evil.example.com:5000")
        assert 400 <= refused < 500, refused
