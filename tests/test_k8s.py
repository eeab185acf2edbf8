"""k8s/: the infrastructure overlays (dev, prod: multi-user with the Profile in k8s/profile; single-user),
the Profile, and the TrainJob the multi-node train step creates. Every rendered object validates: core
objects against Kubernetes 1.37 (kubernetes-validate, strict), the Profile and the TrainJob against the CRDs
published by Kubeflow (k8s/crds/), the torch-distributed runtime the TrainJob names against its CRD. Then
what each object must say: where things land, least-privilege RBAC, the admission policies that make the
data read-only for the pods the compiled pipeline labels, locked-down workloads, and checkov."""

from __future__ import annotations

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

from pipelines.names import COMPILED
from pipelines.runtime import node_resources
from pipelines.trainjob import TrainJobRequest, trainjob_manifest

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
K8S_VERSION = "1.37.0"
OVERLAYS = {"dev": "atmask-pipelines", "prod": "atmask-pipelines", "single-user": "kubeflow"}  # -> runs' ns
CRDS = {
    "Profile": "kubeflow.org_profiles.yaml",
    "TrainJob": "trainer.kubeflow.org_trainjobs.yaml",
    "ClusterTrainingRuntime": "trainer.kubeflow.org_clustertrainingruntimes.yaml",
}
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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


def render(target: Path) -> list[dict[str, Any]]:
    kubectl = tool(".tools/kubectl/bin/kubectl", "kubectl")
    result = subprocess.run([kubectl, "kustomize", str(target)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module")
def infra() -> dict[str, list[dict[str, Any]]]:
    return {o: render(K8S / "overlays" / o) for o in OVERLAYS}


@pytest.fixture(scope="module")
def profile() -> list[dict[str, Any]]:
    return render(K8S / "profile")


def trainjob_request(nodes: int = 4, gpus: int = 8) -> TrainJobRequest:
    return TrainJobRequest(
        pipeline_run="9b1f0c2e-5d4a-4f3b-9a6e-2c7d8e9f0a1b",
        ablation="atmask",
        seed=1,
        image="ghcr.io/atmask-rcnn/atmask@sha256:" + "0" * 64,
        namespace="atmask-pipelines",
        nodes=nodes,
        resources=node_resources(gpus),
        params="/mnt/atmask-runs/checkpoints/run/atmask/seed1/params.yaml",
        data_dir="/mnt/atmask-datasets/dvc/" + "c" * 32,
        out_dir="/mnt/atmask-runs/checkpoints/run/atmask/seed1",
        timeout_s=7 * 24 * 3600,
        env={"ATMASK_GIT_COMMIT": "a" * 40, "ATMASK_SOURCE_TYPE": "JOB"},
    )


@pytest.fixture(scope="module")
def trainjob() -> dict[str, Any]:
    return trainjob_manifest(trainjob_request())


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


# ------------------------------------------------------------------ CRD schemas


def json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI v3 (CRD structural schema) -> JSON schema; unknown fields rejected as the API server's strict
    field validation does, except where the CRD preserves them. (CEL rules are the server's to check.)"""
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    node = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "format"}
    if "properties" in node:
        node["properties"] = {k: json_schema(v) for k, v in node["properties"].items()}
        if not preserve:
            node.setdefault("additionalProperties", False)
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = json_schema(node["additionalProperties"])
    for key in ("items",):
        if key in node:
            node[key] = json_schema(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [json_schema(s) for s in node[key]]
    return node


@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, dict[str, Any]]:
    schemas = {}
    for kind, file in CRDS.items():
        (crd,) = [d for d in yaml.load_all((K8S / "crds" / file).read_text(), Loader=Loader) if d]
        assert crd["spec"]["names"]["kind"] == kind
        (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
        schemas[kind] = {"version": f"{crd['spec']['group']}/{version['name']}"} | json_schema(
            version["schema"]["openAPIV3Schema"]
        )
    return schemas


def validate(doc: dict[str, Any], crd_schemas: dict[str, dict[str, Any]]) -> None:
    """A custom resource against its published CRD; everything else against Kubernetes 1.37."""
    if doc["kind"] in crd_schemas:
        schema = dict(crd_schemas[doc["kind"]])
        assert doc["apiVersion"] == schema.pop("version")
        jsonschema.validate(doc, schema)
    else:
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == "1.37"


def trainjob_pod(job: dict[str, Any]) -> dict[str, Any]:
    """The pod a TrainJob's node gets: the torch-distributed runtime's template, our image, command,
    resources and env, and our runtime patch (as Kubeflow Trainer merges them)."""
    runtime = yaml.safe_load((K8S / "trainer" / "torch-distributed.yaml").read_text())
    (replicated,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    pod = copy.deepcopy(replicated["template"]["spec"]["template"])
    (patch,) = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert patch["name"] == replicated["name"] == "node"
    patched = patch["template"]["spec"]["template"]
    pod["metadata"] = patched["metadata"]
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    spec = {**pod["spec"], **{k: v for k, v in patched["spec"].items() if k != "containers"}}
    for change in patched["spec"]["containers"]:
        containers[change["name"]].update(change)
    trainer = job["spec"]["trainer"]
    node = containers["node"]
    node.update(image=trainer["image"], command=trainer["command"], env=trainer["env"])
    node["resources"] = trainer["resourcesPerNode"]
    spec["containers"] = list(containers.values())
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "atmask-node-0-0", "namespace": "x",
            **pod["metadata"]}, "spec": spec}  # fmt: skip


# ------------------------------------------------------------------ tests


def test_every_rendered_object_validates(
    infra: dict[str, list[dict[str, Any]]],
    profile: list[dict[str, Any]],
    trainjob: dict[str, Any],
    crd_schemas: dict[str, dict[str, Any]],
) -> None:
    for docs in [*infra.values(), profile]:
        for doc in docs:
            validate(doc, crd_schemas)
    for nodes, gpus in ((2, 1), (4, 8)):
        validate(trainjob_manifest(trainjob_request(nodes, gpus)), crd_schemas)
    runtime = yaml.safe_load((K8S / "trainer" / "torch-distributed.yaml").read_text())
    validate(runtime, crd_schemas)
    assert runtime["metadata"]["name"] == trainjob["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert "torch" in runtime["spec"]["mlPolicy"]  # sets PET_* for torchrun
    pod = trainjob_pod(trainjob)  # what the runtime and our patch make: a valid core/v1 pod
    assert kubernetes_validate.validate(pod, K8S_VERSION, strict=True) == "1.37"


def test_validators_reject_broken_objects(
    infra: dict[str, list[dict[str, Any]]],
    profile: list[dict[str, Any]],
    trainjob: dict[str, Any],
    crd_schemas: dict[str, dict[str, Any]],
) -> None:
    bad = copy.deepcopy(trainjob)
    bad["spec"]["trainer"]["numNodes"] = "four"
    with pytest.raises(jsonschema.ValidationError, match="'four' is not of type 'integer'"):
        validate(bad, crd_schemas)
    bad = copy.deepcopy(trainjob)
    bad["spec"]["trainer"]["gpusPerNode"] = 8  # not a TrainJob field
    with pytest.raises(jsonschema.ValidationError, match="gpusPerNode"):
        validate(bad, crd_schemas)
    bad = copy.deepcopy(trainjob)
    bad["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"
    ]["spec"]["template"]["spec"][
        "priorityClassName"
    ] = "x"  # a runtime patch cannot set it (admission.yaml does)
    with pytest.raises(jsonschema.ValidationError, match="priorityClassName"):
        validate(bad, crd_schemas)
    bad = copy.deepcopy(by_kind(profile, "Profile")["atmask-pipelines"])
    bad["spec"]["owner"] = {"kind": "User"}
    with pytest.raises(jsonschema.ValidationError, match="'name' is a required property"):
        validate(bad, crd_schemas)
    deployment = copy.deepcopy(by_kind(infra["prod"], "Deployment")["mlflow"])
    deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = [2]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment, crd_schemas)


def test_overlays_render_expected_objects(infra: dict[str, list[dict[str, Any]]], profile) -> None:
    def objects(ns: str) -> set[tuple[str, str | None, str]]:
        found = {
            ("Namespace", None, "atmask"),
            ("ServiceAccount", "atmask", "mlflow"),
            ("Deployment", "atmask", "mlflow"),
            ("Service", "atmask", "mlflow"),
            ("NetworkPolicy", "atmask", "default-deny-ingress"),
            ("NetworkPolicy", "atmask", "mlflow-from-pipelines"),
            ("PriorityClass", None, "atmask-gpu-training"),
            *((kind, None, name) for kind in ("MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding")
              for name in ("atmask-pipeline-fsgroup", "atmask-datasets-read-only", "atmask-gpu-priority")),
            ("NetworkPolicy", ns, "trainjob-peers-only"),
            ("PersistentVolumeClaim", ns, "atmask-datasets"),
            ("PersistentVolumeClaim", ns, "atmask-runs"),
            ("ServiceAccount", ns, "atmask-pipeline-runner"),
            ("ServiceAccount", ns, "atmask-trainer"),
            ("Role", ns, "atmask-pipeline-runner"),
            ("RoleBinding", ns, "atmask-pipeline-runner"),
        }  # fmt: skip
        if ns == "atmask-pipelines":  # multi-user: quota, defaults, the submitter's token
            found |= {
                ("ResourceQuota", ns, "atmask-gpu-quota"),
                ("LimitRange", ns, "atmask-defaults"),
                ("ServiceAccount", ns, "atmask-pipeline-submitter"),
                ("RoleBinding", ns, "atmask-pipeline-submitter"),
            }
        return found

    for overlay, docs in infra.items():
        found = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs}
        extra = set()
        if overlay == "prod":
            extra = {("PodDisruptionBudget", "atmask", "mlflow")}
            (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
            extra.add(("ConfigMap", "atmask", cm["metadata"]["name"]))
        assert found == objects(OVERLAYS[overlay]) | extra, overlay
        env = "dev" if overlay == "single-user" else overlay
        for doc in docs:
            assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "atmask"
            assert doc["metadata"]["labels"]["atmask.io/environment"] == env
        assert not any(d["kind"] == "Secret" for d in docs), "secrets are referenced, never shipped"
        assert not any(d["kind"] == "Namespace" and d["metadata"]["name"] != "atmask" for d in docs)
        assert not any(d["apiVersion"].startswith(("kubeflow.org/", "trainer.kubeflow.org/")) for d in docs)
    ((kind, name),) = {(d["kind"], d["metadata"]["name"]) for d in profile}
    assert (kind, name) == ("Profile", "atmask-pipelines")  # creates and owns the pipeline namespace


def test_everything_a_run_needs_lands_where_runs_go(infra: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, docs in infra.items():
        ns = OVERLAYS[overlay]
        runner = by_kind(docs, "RoleBinding")["atmask-pipeline-runner"]
        assert runner["subjects"] == [
            {"kind": "ServiceAccount", "name": "atmask-pipeline-runner", "namespace": ns}
        ]
        allow = by_kind(docs, "NetworkPolicy")["mlflow-from-pipelines"]["spec"]["ingress"][0]
        assert allow["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}]
        assert allow["ports"] == [{"protocol": "TCP", "port": 5000}]
        for binding in by_kind(docs, "MutatingAdmissionPolicyBinding").values():
            selector = binding["spec"]["matchResources"]["namespaceSelector"]
            assert selector == {"matchLabels": {"kubernetes.io/metadata.name": ns}}
            assert binding["spec"]["policyName"] == binding["metadata"]["name"]
        for doc in docs:
            namespace = doc["metadata"].get("namespace")
            assert namespace in (None, "atmask", ns), (overlay, doc["kind"], doc["metadata"]["name"])


def test_the_compiled_pipeline_and_the_admission_policies_agree(
    infra: dict[str, list[dict[str, Any]]],
) -> None:
    """KFP cannot mount a volume read-only or set fsGroup or a PriorityClass; the pipeline labels its pods and
    the policies act on exactly those labels, the volume KFP mounts and the container KFP runs ("main")."""
    _, platform = yaml.safe_load_all(COMPILED.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    policies = by_kind(infra["prod"], "MutatingAdmissionPolicy")

    def expressions(name: str) -> str:
        spec = policies[name]["spec"]
        assert spec["failurePolicy"] == "Fail" and spec["matchConstraints"]["resourceRules"][0][
            "resources"
        ] == ["pods"]
        conditions = " ".join(c["expression"] for c in spec.get("matchConditions", []))
        return conditions + " " + " ".join(m["applyConfiguration"]["expression"] for m in spec["mutations"])

    read_only = expressions("atmask-datasets-read-only")
    for name in ("exec-train-op", "exec-evaluate-op"):
        labels = executors[name]["podMetadata"]["labels"]
        assert labels["atmask.io/datasets"] == "read-only" and "'atmask.io/datasets'" in read_only
        mount = next(m for m in executors[name]["pvcMount"] if m["constant"] == "atmask-datasets")
        assert f'mountPath: "{mount["mountPath"]}", readOnly: true' in read_only  # the main container's mount
        assert 'claimName: "atmask-datasets", readOnly: true' in read_only  # and the claim
        assert "c.name == 'main'" in read_only and 'name: "main"' in read_only
        assert labels["atmask.io/priority"] == "gpu"
    assert "atmask.io/datasets" not in executors["exec-data-op"]["podMetadata"]["labels"]  # the writer
    assert all(
        e["podMetadata"]["labels"]["atmask.io/pipeline"] == "atmask-ablation" for e in executors.values()
    )
    assert "fsGroup: 10001" in expressions("atmask-pipeline-fsgroup")
    priority = expressions("atmask-gpu-priority")
    klass = by_kind(infra["prod"], "PriorityClass")["atmask-gpu-training"]
    assert f'priorityClassName: "{klass["metadata"]["name"]}", priority: {klass["value"]}' in priority
    assert f'preemptionPolicy: "{klass["preemptionPolicy"]}"' in priority


def test_workloads_are_locked_down(infra: dict[str, list[dict[str, Any]]], trainjob: dict[str, Any]) -> None:
    pods = [
        d["spec"]["template"]["spec"] for docs in infra.values() for d in docs if d["kind"] == "Deployment"
    ]
    pods.append(trainjob_pod(trainjob)["spec"])
    for spec in pods:
        assert (
            spec.get("automountServiceAccountToken") is False
            or spec["serviceAccountName"] == "atmask-trainer"
        )
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] >= 10000
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind])
            repo, _, digest = c["image"].partition("@sha256:")
            assert len(digest) == 64 and ":" not in repo.rsplit("/", 1)[-1], c["image"]
            for entry in c.get("env", []):
                if any(w in entry["name"] for w in ("PASSWORD", "SECRET", "ACCESS_KEY", "STORE_URI")):
                    assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], entry["name"]
    for docs in infra.values():
        (mlflow,) = spec_of(by_kind(docs, "Deployment")["mlflow"])["containers"]
        assert mlflow["livenessProbe"]["httpGet"]["path"] == "/health"
        assert mlflow["readinessProbe"]["httpGet"]["path"] == "/health"


def spec_of(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def test_pipeline_rbac_is_exactly_what_runs_need(infra: dict[str, list[dict[str, Any]]]) -> None:
    for docs in infra.values():
        assert not any(d["kind"] in ("ClusterRole", "ClusterRoleBinding") for d in docs)
        rules = {
            (
                tuple(r["apiGroups"]),
                tuple(r["resources"]),
                tuple(r.get("resourceNames", [])),
                tuple(r["verbs"]),
            )
            for r in by_kind(docs, "Role")["atmask-pipeline-runner"]["rules"]
        }
        assert rules == {
            (("argoproj.io",), ("workflowtaskresults",), (), ("create", "patch")),  # Argo's executor
            (("",), ("pods",), (), ("get", "list")),  # KFP's driver/launcher; the TrainJob's rank-0 pod
            (("",), ("pods/log",), (), ("get",)),  # its log
            (("",), ("configmaps",), ("kfp-launcher",), ("get",)),  # KFP's launcher config
            (("",), ("secrets",), ("mlpipeline-minio-artifact",), ("get",)),  # KFP's artifact store
            (("trainer.kubeflow.org",), ("trainjobs",), (), ("create", "get", "delete")),  # the launcher
        }
        accounts = by_kind(docs, "ServiceAccount")
        assert accounts["atmask-trainer"]["automountServiceAccountToken"] is False
        assert not [
            b for b in by_kind(docs, "RoleBinding").values() if b["subjects"][0]["name"] == "atmask-trainer"
        ]
        if "atmask-pipeline-submitter" in accounts:
            binding = by_kind(docs, "RoleBinding")["atmask-pipeline-submitter"]
            assert binding["roleRef"] == {
                "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubeflow-pipelines-edit",
            }  # fmt: skip


def test_overlays_differ_where_intended(infra: dict[str, list[dict[str, Any]]]) -> None:
    quota = {
        o: by_kind(infra[o], "ResourceQuota")["atmask-gpu-quota"]["spec"]["hard"] for o in ("dev", "prod")
    }
    assert (quota["dev"]["requests.nvidia.com/gpu"], quota["prod"]["requests.nvidia.com/gpu"]) == ("2", "32")
    assert by_kind(infra["dev"], "PersistentVolumeClaim")["atmask-datasets"]["spec"]["resources"][
        "requests"
    ] == {"storage": "10Gi"}
    limits = by_kind(infra["prod"], "LimitRange")["atmask-defaults"]["spec"]["limits"][0]
    assert (
        limits["defaultRequest"]["ephemeral-storage"] == "1Gi"
        and limits["default"]["ephemeral-storage"] == "20Gi"
    )
    assert not by_kind(infra["single-user"], "LimitRange")  # it would bind KFP's own pods in `kubeflow`


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


def test_checkov_finds_nothing(
    tmp_path: Path, infra: dict[str, list[dict[str, Any]]], profile, trainjob: dict[str, Any]
) -> None:
    """The rendered overlays and Profile, exactly as applied, and the pod a TrainJob makes."""
    files = []
    for name, docs in [*infra.items(), ("profile", profile), ("trainjob-pod", [trainjob_pod(trainjob)])]:
        out = tmp_path / f"{name}.yaml"
        out.write_text(yaml.safe_dump_all(docs))
        files += ["-f", str(out)]
    reports = checkov_reports(["-d", str(K8S), "--framework", "kustomize"])
    reports += checkov_reports([*files, "--framework", "kubernetes"])
    assert [r["check_type"] for r in reports] == ["kustomize", "kubernetes"]
    allowed = {"CKV_K8S_35", "CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_15", "CKV_K8S_38"}  # each with its reason
    for report in reports:
        failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
        assert failed == [], report["check_type"]
        assert report["summary"]["passed"] > 50
        for skipped in report["results"]["skipped_checks"]:
            assert skipped["check_id"] in allowed and len(skipped["check_result"]["suppress_comment"]) > 30


def test_mlflow_schema_is_migrated_once(infra: dict[str, list[dict[str, Any]]]) -> None:
    """dev and single-user (one replica): wait-for-db waits and upgrades the schema; prod (two replicas):
    it only waits, and migrate-once upgrades under a PostgreSQL advisory lock, in the same image."""
    for overlay, docs in infra.items():
        spec = by_kind(docs, "Deployment")["mlflow"]["spec"]["template"]["spec"]
        inits = {c["name"]: c for c in spec["initContainers"]}
        server = spec["containers"][0]["image"]
        assert {c["image"] for c in inits.values()} == {server}, overlay
        if overlay == "prod":
            assert list(inits) == ["wait-for-db", "migrate-once"]
            assert "--no-upgrade" in inits["wait-for-db"]["command"]
        else:
            assert list(inits) == ["wait-for-db"], overlay
            assert "--no-upgrade" not in inits["wait-for-db"]["command"], overlay
