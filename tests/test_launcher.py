"""The multi-node train step's TrainJob launcher, end to end against a local double of the Kubernetes API
(tests/fixtures_k8s.py): create, poll status, follow the rank-0 log, delete; failure, timeout, cancellation,
missing RBAC (403), a namespace that does not exist and an API that is not installed. Every outcome leaves
no TrainJob behind and fails, when it fails, with one line naming the object and what to do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures_k8s import KubeApiDouble, Script
from test_k8s import trainjob_pod, trainjob_request

from components.errors import UserError
from pipelines import runtime
from pipelines.launcher import Launcher
from pipelines.trainjob import NodeResources, TrainJobRequest, trainjob_manifest

ROOT = Path(__file__).resolve().parents[1]
NS = "atmask-pipelines"


def request(tmp_path: Path, namespace: str = NS) -> TrainJobRequest:
    res = NodeResources(8, "64", "128", "384G", "512G")
    return TrainJobRequest(
        pipeline_run="9b1f0c2e-5d4a-4f3b-9a6e-2c7d8e9f0a1b",
        ablation="atmask",
        seed=0,
        image="registry.example.com/atmask@sha256:" + "a" * 64,
        namespace=namespace,
        nodes=4,
        resources=res,
        params=str(tmp_path / "params.yaml"),
        data_dir="/mnt/atmask-datasets/dvc/" + "c" * 32,
        out_dir=str(tmp_path / "run"),
        timeout_s=3600,
    )


def launcher(kube_api: KubeApiDouble, lines: list[str], namespace: str = NS) -> Launcher:
    return Launcher(kube_api.api_client(), namespace, "system:serviceaccount:x:runner", 0.1, lines.append)


def test_a_completed_trainjob_streams_rank0_and_is_deleted(kube_api: KubeApiDouble, tmp_path: Path) -> None:
    kube_api.script = Script(polls_until_done=4)
    lines: list[str] = []
    manifest = trainjob_manifest(request(tmp_path))
    start = time.monotonic()
    launcher(kube_api, lines).run(manifest, timeout_s=60)
    assert time.monotonic() - start < 10
    name = manifest["metadata"]["name"]
    assert kube_api.bodies[0] == manifest  # exactly the object the tests validate against the CRD
    assert kube_api.calls[0] == ("create", f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NS}/trainjobs")
    assert kube_api.verbs()[-1] == "delete" and kube_api.jobs == {}
    assert kube_api.bodies[-1]["propagationPolicy"] == "Foreground"
    assert f"[{name}-node-0-0-x7k2p] rank 0: iteration 2" in lines
    logs = [path for verb, path in kube_api.calls if verb == "log"]
    assert logs and "container=node" in logs[0] and "follow=true" in logs[0].lower()
    pods = [
        path
        for verb, path in kube_api.calls
        if verb == "get" and path.startswith(f"/api/v1/namespaces/{NS}/pods?")
    ]
    assert pods and "batch.kubernetes.io%2Fjob-completion-index%3D0" in pods[0]


def test_a_failed_trainjob_is_one_line_and_deleted(kube_api: KubeApiDouble, tmp_path: Path) -> None:
    kube_api.script = Script(outcome="Failed", reason="JobSetFailed", message="node-1 exited with 1")
    manifest = trainjob_manifest(request(tmp_path))
    with pytest.raises(UserError) as err:
        launcher(kube_api, []).run(manifest, timeout_s=60)
    name = manifest["metadata"]["name"]
    assert str(err.value) == (
        f"TrainJob {NS}/{name} failed (JobSetFailed: node-1 exited with 1); its rank-0 log is above; "
        "deleted the TrainJob"
    )
    assert kube_api.jobs == {} and kube_api.verbs()[-1] == "delete"


def test_a_trainjob_past_its_timeout_is_deleted(kube_api: KubeApiDouble, tmp_path: Path) -> None:
    kube_api.script = Script(outcome="never")
    with pytest.raises(
        UserError, match=r"not finished after 1 s; deleted the TrainJob\. Raise the pipeline "
    ):
        launcher(kube_api, []).run(trainjob_manifest(request(tmp_path)), timeout_s=1)
    assert kube_api.jobs == {} and kube_api.verbs()[-1] == "delete"


def test_missing_rbac_is_one_line_and_nothing_is_created(kube_api: KubeApiDouble, tmp_path: Path) -> None:
    denied = (
        'trainjobs.trainer.kubeflow.org is forbidden: User "system:serviceaccount:atmask-pipelines:default" '
        'cannot create resource "trainjobs" in API group "trainer.kubeflow.org"'
    )
    kube_api.script = Script(create_status=403, create_message=denied)
    manifest = trainjob_manifest(request(tmp_path))
    with pytest.raises(UserError) as err:
        launcher(kube_api, []).run(manifest, timeout_s=60)
    message = str(err.value)
    assert message.startswith(
        f"TrainJob {NS}/{manifest['metadata']['name']}: system:serviceaccount:x:runner may not"
    )
    assert "(HTTP 403: trainjobs.trainer.kubeflow.org is forbidden" in message
    assert message.endswith("submit with --service-account atmask-pipeline-runner") and "\n" not in message
    assert "delete" not in kube_api.verbs() and kube_api.jobs == {}


def test_a_namespace_that_does_not_exist_is_named(kube_api: KubeApiDouble, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"namespace nowhere does not exist .*a Profile's namespace"):
        launcher(kube_api, [], "nowhere").run(trainjob_manifest(request(tmp_path, "nowhere")), timeout_s=60)
    assert kube_api.jobs == {}


def test_an_earlier_attempts_trainjob_is_replaced(kube_api: KubeApiDouble, tmp_path: Path) -> None:
    manifest = trainjob_manifest(request(tmp_path))
    kube_api.jobs[manifest["metadata"]["name"]] = {**manifest, "status": {}}  # left by a killed pod
    launcher(kube_api, []).run(manifest, timeout_s=60)
    assert kube_api.verbs()[:3] == ["create", "delete", "get"]
    assert kube_api.jobs == {}


CANCEL_SCRIPT = """
import json, sys
from kubernetes import client
from components.errors import UserError
from pipelines.launcher import Launcher
config = client.Configuration(); config.host = sys.argv[1]
manifest = json.loads(open(sys.argv[2]).read())
try:
    Launcher(client.ApiClient(config), manifest["metadata"]["namespace"], "", 0.1).run(manifest, 600)
except UserError as err:
    sys.exit(f"atmask pipeline: error: {err}")
"""


def test_cancelling_the_task_deletes_the_trainjob(kube_api: KubeApiDouble, tmp_path: Path) -> None:
    """SIGTERM (how Kubeflow Pipelines stops a task) while training: the TrainJob is deleted, one line."""
    kube_api.script = Script(outcome="never")
    manifest = trainjob_manifest(request(tmp_path))
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", CANCEL_SCRIPT, kube_api.url, str(tmp_path / "m.json")]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not kube_api.jobs and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kube_api.jobs, "the TrainJob was never created"
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1] == (
        f"atmask pipeline: error: TrainJob {NS}/{manifest['metadata']['name']}: the task was cancelled "
        "(SIGTERM); deleted the TrainJob"
    )
    assert kube_api.jobs == {} and kube_api.verbs()[-1] == "delete"


def test_the_multinode_train_step_hands_the_run_on(
    kube_api: KubeApiDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """runtime.train_step with nodes > 1: a TrainJob in the task's namespace writes the run folder on the runs
    volume (here: the double, as rank 0 would), and the task copies it, without checkpoints, to its Model."""

    def rank0_writes_the_run(job: dict) -> None:
        out = Path(job["spec"]["trainer"]["command"][job["spec"]["trainer"]["command"].index("--out") + 1])
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / "ckpt_4.pt").write_text("ckpt")
        (out / "model.pt").write_text("weights")

    kube_api.script = Script(on_complete=rank0_writes_the_run)
    monkeypatch.setattr(runtime, "api_client", kube_api.api_client)
    monkeypatch.setenv("ATMASK_NAMESPACE", NS)
    monkeypatch.setenv("ATMASK_PIPELINE_RUN_ID", "run-1")
    params, work, model = (
        tmp_path / "p.yaml",
        tmp_path / "ckpt" / "run-1" / "atmask" / "seed0",
        tmp_path / "model",
    )
    params.write_text("a: 1\n")
    job = runtime.MultiNode(image="img@sha256:" + "b" * 64, nodes=2, gpus=8, timeout_s=60, poll_s=0.1)
    runtime.train_step(params, "atmask", 0, tmp_path / "data", model, work, job)
    assert sorted(p.name for p in model.iterdir()) == ["model.pt", "params.yaml"]
    (created,) = [b for b in kube_api.bodies if b.get("kind") == "TrainJob"]
    assert created["spec"]["trainer"]["numNodes"] == 2
    assert created["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert created["metadata"]["namespace"] == NS and kube_api.jobs == {}


def test_trainjob_runs_the_same_command_read_only_data_and_scaled_resources() -> None:
    trainjob = trainjob_manifest(trainjob_request())
    trainer = trainjob["spec"]["trainer"]
    assert trainjob["spec"]["runtimeRef"] == {
        "name": "torch-distributed",
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
    }
    assert trainer["command"][:4] == ["torchrun", "-m", "components.cli", "train"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 8)
    assert trainer["resourcesPerNode"]["requests"] == {
        "cpu": "64", "memory": "384G", "ephemeral-storage": "20Gi", "nvidia.com/gpu": "8",
    }  # fmt: skip
    small = trainjob_manifest(trainjob_request(2, 1))["spec"]["trainer"]
    assert small["resourcesPerNode"]["limits"]["cpu"] == "16" and small["numProcPerNode"] == 1
    pod = trainjob_pod(trainjob)
    assert pod["metadata"]["labels"]["atmask.io/priority"] == "gpu"  # the PriorityClass (admission.yaml)
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "train"  # trainjob-peers-only
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    spec = pod["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["datasets"]["persistentVolumeClaim"] == {"claimName": "atmask-datasets", "readOnly": True}
    (node,) = spec["containers"]
    mounts = {m["name"]: m for m in node["volumeMounts"]}
    assert mounts["datasets"] == {"name": "datasets", "mountPath": "/mnt/atmask-datasets", "readOnly": True}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"}  # sized by the memory limit
    assert spec["securityContext"]["fsGroup"] == 10001 and spec["serviceAccountName"] == "atmask-trainer"
    env = {e["name"]: e for e in node["env"]}
    assert env["ATMASK_GIT_COMMIT"]["value"] == "a" * 40
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "atmask-mlflow-client"
    assert not {"PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR"} & set(
        env
    )  # reserved: the runtime sets them
