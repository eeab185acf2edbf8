"""The Kubeflow pipeline as compiled: fresh, the DAG, parameter defaults (the cluster profile), resources per
GPU and node, data by reference and read-only, secrets, caching; the runtime helpers its tasks use."""

import json
from pathlib import Path

import pytest
import yaml

from components.errors import UserError
from pipelines import pipeline as pl
from pipelines import runtime
from pipelines.cli import parse_params
from pipelines.main import main as atmask
from pipelines.names import COMPILED

GPU_TASKS = ("exec-train-op", "exec-evaluate-op")


def load_spec(path: Path) -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    assert len(docs) == 2, "pipeline spec + kubernetes platform spec"
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def compiled() -> tuple[dict, dict]:
    return load_spec(COMPILED)


def test_committed_pipeline_is_up_to_date(tmp_path: Path, repo_root: Path) -> None:
    out = tmp_path / "fresh.yaml"
    image = pl.compiled_image(COMPILED)
    assert atmask(["pipeline", "compile", "--out", str(out), "--params", str(repo_root / "params.yaml")]) == 0
    assert out.read_text() == COMPILED.read_text(), (
        "pipelines/atmask_pipeline.yaml is stale: run 'atmask pipeline compile' and commit it"
    )
    assert pl.compiled_image(out) == image


def test_dag_shape(compiled: tuple[dict, dict]) -> None:
    spec, _ = compiled
    assert spec["pipelineInfo"]["name"] == "atmask-ablation"
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"config-op", "data-op", "for-loop-1", "report-op", "register-op"}
    # one loop item per (ablation, seed), listed by the config task from ablations x train.seeds
    items = root["for-loop-1"]["parameterIterator"]["items"]["inputParameter"]
    assert items == "pipelinechannel--config-op-Output"
    loop = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
    assert set(loop) == {"resources-op", "train-op", "evaluate-op"}
    assert loop["train-op"]["dependentTasks"] == ["resources-op"]
    assert loop["evaluate-op"]["dependentTasks"] == ["train-op"]
    assert set(root["register-op"]["dependentTasks"]) == {"config-op", "for-loop-1", "report-op"}
    assert set(root["for-loop-1"]["dependentTasks"]) == {"config-op", "data-op"}
    # report and register receive the collected (fanned-in) evaluated runs as a list of Models
    runs = spec["components"]["comp-report-op"]["inputDefinitions"]["artifacts"]["runs"]
    assert runs == {
        "artifactType": {"schemaTitle": "system.Model", "schemaVersion": "0.0.1"},
        "isArtifactList": True,
    }
    metrics = spec["components"]["comp-evaluate-op"]["outputDefinitions"]["artifacts"]["metrics"]
    assert metrics["artifactType"]["schemaTitle"] == "system.Metrics"
    report = spec["components"]["comp-report-op"]["outputDefinitions"]["artifacts"]["report"]
    assert report["artifactType"]["schemaTitle"] == "system.Markdown"


def test_parameter_defaults_come_from_params_yaml(compiled: tuple[dict, dict], repo_root: Path) -> None:
    spec, _ = compiled
    params = {k: v["defaultValue"] for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    assert json.loads(params.pop("params_json")) == raw
    assert params == {
        "ablations": list(raw["ablations"]),
        "seeds": raw["train"]["seeds"],
        "recipe": raw["cluster"]["recipe"],  # the cluster profile, never the CPU demo
        "gpus_per_node": raw["cluster"]["gpus_per_node"],
        "nodes": raw["cluster"]["nodes"],
        "data_md5": "",  # submit fills these from dvc.lock, .dvc/config and git
        "data_path": raw["data"]["out"],
        "dvc_remote": "",
        "git_commit": "",
        "git_repo": "",
        "mlflow_tracking_uri": "",
        "register_candidate": raw["register"]["candidate"],
        "register_min_improvement": raw["register"]["min_improvement"],
        "overrides": "{}",
        "data_root": "/mnt/atmask-datasets/dvc",
        "checkpoint_root": "/mnt/atmask-runs/checkpoints",
        "train_timeout_s": 7 * 24 * 3600,
    }
    assert params["recipe"] != "cpu_demo" and raw["train"]["recipe"] == "cpu_demo"


def test_other_params_file_and_image_change_defaults(tmp_path: Path, repo_root: Path) -> None:
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["cluster"]["recipe"] = "r101_fpn_coco"
    raw["mlflow"]["tracking_uri"] = "http://mlflow.atmask:5000"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "p.yaml"
    image = "registry.example.com/atmask@sha256:" + "a" * 64
    argv = ["pipeline", "compile", "--out", str(out), "--params", str(tmp_path / "params.yaml")]
    assert atmask([*argv, "--image", image, "--gpus", "8"]) == 0
    spec, _ = load_spec(out)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["recipe"]["defaultValue"] == "r101_fpn_coco"
    assert params["gpus_per_node"]["defaultValue"] == 8
    assert params["mlflow_tracking_uri"]["defaultValue"] == "http://mlflow.atmask:5000"
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {image}
    train = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]["train-op"]["inputs"]["parameters"]
    assert train["image"] == {"runtimeValue": {"constant": image}}  # what a TrainJob runs
    assert pl.compiled_image(out) == image


def test_train_resources_follow_the_gpus_and_nodes_parameters(compiled: tuple[dict, dict]) -> None:
    """gpus_per_node and nodes are run-time parameters: the config task turns them into the train task's
    requests (CPU, memory scale per GPU; /dev/shm is memory-backed and sized by the memory limit; the
    DataLoader workers are per process, torchrun starts one process per GPU), or a small launcher pod."""
    assert runtime.train_task_resources(1, 1) == {
        "cpu_request": "8", "cpu_limit": "16", "memory_request": "48G", "memory_limit": "64G", "gpus": "1",
        "node_selector": {"nvidia.com/gpu.present": "true"},
    }  # fmt: skip
    four = runtime.train_task_resources(4, 1)
    assert (four["gpus"], four["cpu_request"], four["cpu_limit"], four["memory_limit"]) == (
        "4",
        "32",
        "64",
        "256G",
    )
    launcher = runtime.train_task_resources(8, 4)  # a TrainJob of 4 nodes x 8 GPUs trains; this pod waits
    assert (launcher["gpus"], launcher["cpu_limit"], launcher["node_selector"]) == ("0", "2", {})
    assert runtime.node_resources(8).requirements()["limits"] == {
        "cpu": "128", "memory": "512G", "ephemeral-storage": "50Gi", "nvidia.com/gpu": "8",
    }  # fmt: skip
    with pytest.raises(UserError, match="gpus_per_node=0, nodes=1: both must be >= 1"):
        runtime.train_task_resources(0, 1)
    spec, platform = compiled
    res = spec["deploymentSpec"]["executors"]["exec-train-op"]["container"]["resources"]
    channel = "{{$.inputs.parameters['pipelinechannel--resources-op-%s']}}"
    assert res["accelerator"]["resourceCount"] == channel % "gpus"
    assert (res["resourceCpuRequest"], res["resourceCpuLimit"]) == (
        channel % "cpu_request",
        channel % "cpu_limit",
    )
    assert res["resourceMemoryLimit"] == channel % "memory_limit"
    selector = platform["exec-train-op"]["nodeSelector"]["nodeSelectorJson"]
    assert selector == {
        "taskOutputParameter": {"outputParameterKey": "node_selector", "producerTask": "resources-op"}
    }
    loop = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
    for task in ("resources-op", "train-op"):
        assert loop[task]["inputs"]["parameters"]["nodes"] == {
            "componentInputParameter": "pipelinechannel--nodes"
        }
        gpus = loop[task]["inputs"]["parameters"]["gpus_per_node"]
        assert gpus == {"componentInputParameter": "pipelinechannel--gpus_per_node"}
    cpu = loop["train-op"]["inputs"]["parameters"]["pipelinechannel--resources-op-cpu_limit"]
    assert cpu == {"taskOutputParameter": {"outputParameterKey": "cpu_limit", "producerTask": "resources-op"}}


def test_batch_that_does_not_split_over_the_processes_fails_in_config(
    tmp_path: Path, repo_root: Path
) -> None:
    raw = json.dumps(yaml.safe_load((repo_root / "params.yaml").read_text()))
    path = runtime.write_params(raw, {"train.recipe": "r50_fpn_coco"}, tmp_path)
    assert len(runtime.run_items(path, ["baseline", "atmask"], 4)) == 2  # batch 12 over 4 GPUs
    with pytest.raises(
        UserError, match=r"recipes.r50_fpn_coco.batch_size 12 .* not divisible by 16 processes"
    ):
        runtime.run_items(path, ["baseline"], 16)


def test_gpu_tasks_placement_shm_labels_and_retry(compiled: tuple[dict, dict]) -> None:
    spec, platform = compiled
    executors = spec["deploymentSpec"]["executors"]
    res = executors["exec-evaluate-op"]["container"]["resources"]
    assert (res["accelerator"]["resourceCount"], res["accelerator"]["resourceType"]) == (
        "1",
        "nvidia.com/gpu",
    )
    assert (res["resourceCpuRequest"], res["resourceMemoryLimit"]) == ("8", "64G")
    for name in GPU_TASKS:
        k8s = platform[name]
        assert k8s["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "volumeName": "dshm"}]
        assert k8s["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
        assert k8s["podMetadata"]["labels"] == {
            "atmask.io/pipeline": "atmask-ablation",
            "atmask.io/datasets": "read-only",  # k8s/base/admission.yaml: the data volume read-only
            "atmask.io/priority": "gpu",  # and the GPU PriorityClass
        }
    assert platform["exec-evaluate-op"]["nodeSelector"] == {"labels": {"nvidia.com/gpu.present": "true"}}
    loop = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
    for task in ("train-op", "evaluate-op"):
        assert loop[task]["retryPolicy"] == {
            "backoffDuration": "60s",
            "backoffFactor": 2.0,
            "backoffMaxDuration": "3600s",
            "maxRetryCount": 3,
        }
    for name in ("exec-config-op", "exec-data-op", "exec-resources-op", "exec-report-op", "exec-register-op"):
        assert "accelerator" not in executors[name]["container"]["resources"]
        assert platform[name]["podMetadata"]["labels"] == {"atmask.io/pipeline": "atmask-ablation"}
    # the KFP run id names the checkpoint folder: a retry (same run) resumes, a new run starts afresh;
    # it comes from the pod's label, so it does not enter the cache key (a per-run input would)
    env = {e["name"]: e["fieldPath"] for e in platform["exec-train-op"]["fieldPathAsEnv"]}
    assert env["ATMASK_PIPELINE_RUN_ID"] == "metadata.labels['pipeline/runid']"
    train_inputs = loop["train-op"]["inputs"]["parameters"]
    assert "PIPELINE_JOB_ID" not in json.dumps(train_inputs)


def test_data_by_reference_read_only_in_train_and_evaluate(compiled: tuple[dict, dict]) -> None:
    """The data task alone writes the datasets volume; train and evaluate mount it (made read-only by the
    admission policy matching their label) and receive a path: no dataset is a KFP artifact."""
    spec, platform = compiled
    mounts = {
        name: [(m["constant"], m["mountPath"]) for m in platform[name].get("pvcMount", [])]
        for name in platform
    }
    assert mounts["exec-data-op"] == [("atmask-datasets", "/mnt/atmask-datasets")]
    assert mounts["exec-train-op"] == [
        ("atmask-datasets", "/mnt/atmask-datasets"),
        ("atmask-runs", "/mnt/atmask-runs"),
    ]
    assert mounts["exec-evaluate-op"] == [("atmask-datasets", "/mnt/atmask-datasets")]
    assert "atmask.io/datasets" not in platform["exec-data-op"]["podMetadata"]["labels"]
    loop = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
    for task in ("train-op", "evaluate-op"):  # <data_root>/<hash>: the folder the data task filled
        inputs = loop[task]["inputs"]["parameters"]
        assert inputs["data_md5"] == {"componentInputParameter": "pipelinechannel--data_md5"}
        assert inputs["data_root"] == {"componentInputParameter": "pipelinechannel--data_root"}
    train_artifacts = spec["components"]["comp-train-op"]["inputDefinitions"]["artifacts"]
    assert set(train_artifacts) == {"params_file"}
    assert set(spec["components"]["comp-evaluate-op"]["inputDefinitions"]["artifacts"]) == {
        "params_file",
        "model",
    }
    assert "outputDefinitions" not in spec["components"]["comp-data-op"] or not spec["components"][
        "comp-data-op"
    ]["outputDefinitions"].get("artifacts")
    datasets = [
        (name, key)
        for name, comp in spec["components"].items()
        for key, art in comp.get("outputDefinitions", {}).get("artifacts", {}).items()
        if art["artifactType"]["schemaTitle"] == "system.Dataset"
    ]
    assert datasets == [("comp-report-op", "table")]  # the ablation table (CSV), a few KB


def test_secrets_are_env_from_secret_refs(compiled: tuple[dict, dict]) -> None:
    _, platform = compiled
    expected = {
        "exec-data-op": {"atmask-s3"},  # the DVC remote
        "exec-train-op": {"atmask-s3", "atmask-mlflow-client"},
        "exec-evaluate-op": {"atmask-s3", "atmask-mlflow-client"},
        "exec-register-op": {"atmask-s3", "atmask-mlflow-client"},
        "exec-report-op": {"atmask-mlflow-client"},  # logs the study run
    }
    for name, secrets in expected.items():
        refs = {s["secretName"]: s for s in platform[name]["secretAsEnv"]}
        assert set(refs) == secrets
        for ref in refs.values():
            assert {e["envVar"] for e in ref["keyToEnv"]} <= set(pl.S3_KEYS + pl.MLFLOW_KEYS)
    assert "secretAsEnv" not in platform.get("exec-config-op", {})


def test_no_runtime_installs_and_one_image(compiled: tuple[dict, dict]) -> None:
    spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    assert set(executors) == {
        f"exec-{n}-op" for n in ("config", "data", "resources", "train", "evaluate", "report", "register")
    }
    for executor in executors.values():
        command = " ".join(executor["container"]["command"])
        assert "pip install" not in command and "pip3" not in command
        assert "from pipelines import runtime" in command
    assert len({e["container"]["image"] for e in executors.values()}) == 1


def test_caching_off_only_for_register_and_the_data_task(compiled: tuple[dict, dict]) -> None:
    spec, _ = compiled
    root = spec["root"]["dag"]["tasks"]
    loop = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
    assert root["register-op"]["cachingOptions"] == {}
    assert root["data-op"]["cachingOptions"] == {}
    for task in (
        root["config-op"],
        root["report-op"],
        loop["resources-op"],
        loop["train-op"],
        loop["evaluate-op"],
    ):
        assert task["cachingOptions"] == {"enableCache": True}
    # a train task's cache key holds the data version (its folder is named by the DVC hash), the image,
    # the recipe and the resources, and not the pipeline run
    assert set(loop["train-op"]["inputs"]["parameters"]) >= {"data_md5", "image", "gpus_per_node", "nodes"}
    register_inputs = set(root["register-op"]["inputs"]["parameters"])
    assert {"register_candidate", "register_min_improvement", "mlflow_tracking_uri"} <= register_inputs


# ------------------------------------------------------------------ runtime helpers


def test_write_params_applies_overrides_and_validates(tmp_path: Path, repo_root: Path) -> None:
    raw = json.dumps(yaml.safe_load((repo_root / "params.yaml").read_text()))
    keys = runtime.pipeline_overrides(
        '{"recipes.cpu_demo.iterations": 7}',
        {"data.source": "s3://b/p", "register.candidate": "atmask", "register.min_improvement": 0.5},
    )
    path = runtime.write_params(raw, keys, tmp_path)
    from components.params import load_params

    params = load_params(path)
    assert (params.data.source, params.register.candidate, params.register.min_improvement) == (
        "s3://b/p",
        "atmask",
        0.5,
    )
    assert params.train.iterations == 7
    assert params.mlflow.tracking_uri is None
    with pytest.raises(UserError, match=r"recipes.cpu_demo.itrations: unknown key"):
        runtime.write_params(raw, {"recipes.cpu_demo.itrations": 7}, tmp_path / "bad")
    with pytest.raises(UserError, match="overrides: not valid JSON"):
        runtime.pipeline_overrides("{nope", {})


def test_checkpoint_dir_is_per_pipeline_run_ablation_and_seed(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    assert runtime.checkpoint_dir("", "run-1", "atmask", 0) is None
    assert runtime.checkpoint_dir(str(root), "run-1", "atmask", 0) is None  # volume not mounted
    root.mkdir()
    assert runtime.checkpoint_dir(str(root), "", "atmask", 0) is None  # no run id: no resume
    first = runtime.checkpoint_dir(str(root), "run-1", "atmask", 0)
    assert first == root / "run-1" / "atmask" / "seed0" and first.is_dir()  # created by the task
    assert runtime.checkpoint_dir(str(root), "run-1", "atmask", 0) == first  # the retried task resumes
    others = {
        runtime.checkpoint_dir(str(root), "run-2", "atmask", 0),  # a new pipeline run never resumes
        runtime.checkpoint_dir(str(root), "run-1", "baseline", 0),
        runtime.checkpoint_dir(str(root), "run-1", "atmask", 1),
    }
    assert len(others) == 3 and first not in others


def test_train_step_with_work_dir_resumes_there_and_copies_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def train(params: Path, ablation: str, seed: int, data: Path, out: Path) -> None:
        calls.append(out)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "checkpoints" / f"step{len(calls)}.pt").write_text("ckpt")
        (out / "model.pt").write_text(f"model after attempt {len(calls)}")

    monkeypatch.setattr(runtime, "_train", train)
    work, out = tmp_path / "work", tmp_path / "out"
    runtime.train_step(tmp_path / "p.yaml", "atmask", 0, tmp_path / "data", out, work)
    runtime.train_step(tmp_path / "p.yaml", "atmask", 0, tmp_path / "data", out, work)  # the retried pod
    assert calls == [work, work]
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["step1.pt", "step2.pt"]
    assert sorted(p.name for p in out.iterdir()) == ["model.pt"]
    assert (out / "model.pt").read_text() == "model after attempt 2"


def test_parse_params_checks_names_and_types() -> None:
    declared = {"ablations": "LIST", "data_source": "STRING", "register_min_improvement": "NUMBER_DOUBLE"}
    assert parse_params(
        ["ablations=baseline,atmask", "data_source=s3://b/x", "register_min_improvement=0.5"], declared
    ) == {
        "ablations": ["baseline", "atmask"],
        "data_source": "s3://b/x",
        "register_min_improvement": 0.5,
    }
    assert parse_params(["ablations=[thr]"], declared) == {"ablations": ["thr"]}
    with pytest.raises(UserError, match="--param nope: not a pipeline parameter"):
        parse_params(["nope=1"], declared)
    with pytest.raises(UserError, match="expected number double"):
        parse_params(["register_min_improvement=high"], declared)
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        parse_params(["ablations"], declared)
