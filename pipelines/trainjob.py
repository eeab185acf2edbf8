"""The Kubeflow Trainer ``TrainJob`` that multi-node training runs as (``trainer.kubeflow.org/v1alpha1``).

The pipeline's train task builds it when its ``nodes`` parameter is above 1 and runs it with
:mod:`pipelines.launcher`. It references the ``torch-distributed`` ClusterTrainingRuntime that Kubeflow
Trainer installs (k8s/trainer/torch-distributed.yaml is that runtime, for validation): the runtime's torch
plugin sets ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK`` and ``PET_MASTER_ADDR/PORT``, which
``torchrun`` reads, so every node runs the same ``atmask train`` command as a single-node run, in our image.

What the runtime's pod template lacks comes as a runtime patch: our ServiceAccount (no API access), the
pod security context (non-root, fsGroup so the runs volume is writable), GPU placement, the datasets volume
read-only, the runs volume (checkpoints and the finished run), a memory-backed ``/dev/shm`` and ``/tmp``,
and no Istio sidecar (a Kubeflow profile namespace injects one, and a Job never completes beside it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

API_GROUP, API_VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
RUNTIME = "torch-distributed"  # the ClusterTrainingRuntime Kubeflow Trainer installs
NODE = "node"  # the runtime's replicated job and container
PATCH_MANAGER = "atmask.io/pipeline"
TRAINER_SA = "atmask-trainer"  # k8s/base/rbac.yaml: no token, no role
UID = 10001  # the image's user (Dockerfile)
DATASETS_PVC, DATASETS_MOUNT = "atmask-datasets", "/mnt/atmask-datasets"
RUNS_PVC, RUNS_MOUNT = "atmask-runs", "/mnt/atmask-runs"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")  # set by NVIDIA GPU feature discovery
GPU_PRIORITY_LABEL = ("atmask.io/priority", "gpu")  # k8s/base/admission.yaml gives these pods the class
S3_SECRET, MLFLOW_SECRET = "atmask-s3", "atmask-mlflow-client"
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
MLFLOW_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
CACHE_ENV = {"HOME": "/tmp", "XDG_CACHE_HOME": "/tmp/cache", "MPLCONFIGDIR": "/tmp/matplotlib"}
# Why the training pods differ from checkov's defaults (it reads these annotations; tests/test_k8s.py scans
# the pod a TrainJob makes): batch pods, pinned by digest, credentials the libraries read from env only.
CHECKOV_SKIPS = {
    "checkov.io/skip1": "CKV_K8S_8=a training rank serves no HTTP; a failed rank exits non-zero and its Job restarts it",
    "checkov.io/skip2": "CKV_K8S_9=a training rank serves no HTTP and takes no traffic, nothing to be ready for",
    "checkov.io/skip3": "CKV_K8S_15=the image is pinned by digest (atmask image push), IfNotPresent pulls it exactly",
    "checkov.io/skip4": "CKV_K8S_35=mlflow and boto3 read tracking and S3 credentials from env vars only; values come from Secrets",
    "checkov.io/skip5": "CKV_K8S_38=TrainJob pod patches have no automount field; ServiceAccount atmask-trainer mounts no token",
}


@dataclass(frozen=True)
class NodeResources:
    """What one training node (pod) asks for; CPU, memory and ephemeral storage scale with its GPUs."""

    gpus: int
    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str
    ephemeral_request: str = "20Gi"
    ephemeral_limit: str = "50Gi"

    def requirements(self) -> dict[str, dict[str, str]]:
        gpus = str(self.gpus)
        return {
            "requests": {
                "cpu": self.cpu_request,
                "memory": self.memory_request,
                "ephemeral-storage": self.ephemeral_request,
                GPU_RESOURCE: gpus,
            },
            "limits": {
                "cpu": self.cpu_limit,
                "memory": self.memory_limit,
                "ephemeral-storage": self.ephemeral_limit,
                GPU_RESOURCE: gpus,
            },
        }


@dataclass(frozen=True)
class TrainJobRequest:
    """One multi-node training run: which (ablation, seed) of which pipeline run, and where it reads and
    writes (paths inside the shared volumes, the same in the launcher pod and in the training pods)."""

    pipeline_run: str
    ablation: str
    seed: int
    image: str
    namespace: str
    nodes: int
    resources: NodeResources
    params: str  # params.yaml on the runs volume
    data_dir: str  # the pulled data version on the datasets volume
    out_dir: str  # the run folder on the runs volume
    timeout_s: int
    env: dict[str, str] = field(default_factory=dict)  # git provenance, an explicit tracking URI

    @property
    def name(self) -> str:
        """Short and unique per (pipeline run, ablation, seed): JobSet derives pod hostnames from it."""
        key = f"{self.pipeline_run}\0{self.ablation}\0{self.seed}".encode()
        return f"atmask-{hashlib.sha256(key).hexdigest()[:12]}"

    def command(self) -> list[str]:
        args = ["--config", self.ablation, "--seed", str(self.seed), "--params", self.params]
        return [
            "torchrun",
            "-m",
            "components.cli",
            "train",
            *args,
            "--data",
            self.data_dir,
            "--out",
            self.out_dir,
        ]


def _env(req: TrainJobRequest) -> list[dict[str, Any]]:
    env = [{"name": k, "value": v} for k, v in {**CACHE_ENV, "NUMBA_CACHE_DIR": "/tmp/numba"}.items()]
    for key in MLFLOW_KEYS:
        if key not in req.env:
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": MLFLOW_SECRET, "key": key}}})
    for key in S3_KEYS:
        env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": S3_SECRET, "key": key}}})
    return env + [{"name": k, "value": v} for k, v in sorted(req.env.items())]


def _pod_spec() -> dict[str, Any]:
    volumes = [
        {"name": "datasets", "persistentVolumeClaim": {"claimName": DATASETS_PVC, "readOnly": True}},
        {"name": "runs", "persistentVolumeClaim": {"claimName": RUNS_PVC}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # sized to the pod's memory limit
        {"name": "tmp", "emptyDir": {"sizeLimit": "20Gi"}},
    ]
    mounts = [
        {"name": "datasets", "mountPath": DATASETS_MOUNT, "readOnly": True},
        {"name": "runs", "mountPath": RUNS_MOUNT},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    container_security = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    return {
        "serviceAccountName": TRAINER_SA,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "nodeSelector": dict([GPU_NODE_LABEL]),
        "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
        "volumes": volumes,
        "containers": [{"name": NODE, "volumeMounts": mounts, "securityContext": container_security}],
    }


def trainjob_manifest(req: TrainJobRequest) -> dict[str, Any]:
    """The TrainJob object to create (validated in tests against the CRD shipped in k8s/crds/)."""
    labels = {
        "app.kubernetes.io/part-of": "atmask",
        "app.kubernetes.io/component": "train",
        "atmask.io/ablation": req.ablation,
        "atmask.io/seed": str(req.seed),
        "atmask.io/pipeline-run": req.pipeline_run,
    }
    pod_template = {
        "metadata": {
            "labels": {**labels, GPU_PRIORITY_LABEL[0]: GPU_PRIORITY_LABEL[1]},
            "annotations": {"sidecar.istio.io/inject": "false", **CHECKOV_SKIPS},
        },
        "spec": _pod_spec(),
    }
    replicated = {"name": NODE, "template": {"spec": {"template": pod_template}}}
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": req.name, "namespace": req.namespace, "labels": labels},
        "spec": {
            "runtimeRef": {"name": RUNTIME, "apiGroup": API_GROUP, "kind": "ClusterTrainingRuntime"},
            "trainer": {
                "image": req.image,
                "command": req.command(),
                "env": _env(req),
                "numNodes": req.nodes,
                "numProcPerNode": req.resources.gpus,
                "resourcesPerNode": req.resources.requirements(),
            },
            "runtimePatches": [
                {
                    "manager": PATCH_MANAGER,
                    "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [replicated]}}},
                }
            ],
            "activeDeadlineSeconds": req.timeout_s,
        },
    }
