"""Local reproduction with DVC: the real `dvc` CLI on a temporary copy of this repository.

- the whole DAG (ingest -> train@* -> evaluate@* -> report -> register) runs with `dvc repro` at tiny sizes;
- a second `dvc repro` does nothing; changing one ablation's `k` re-runs exactly its branch + report/register;
- data and models go to an S3 remote served by a real S3 API server on 127.0.0.1 and come back;
- a bad params.yaml stops the first stage with the key's name, and nothing downstream runs;
- every stage's deps cover the modules its command imports.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from components.params import load_params, set_dotted
from pipelines.cli import LOCAL_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = ("baseline", "thr", "thr_p2t", "thr_fusion", "atmask_k1", "atmask", "atmask_border")
GENERATED = {"runs", "reports", "data", "dvc.lock", "mlflow.db", "dvc_plots", "predictions"}  # a local run's
STAGE_MODULES = {  # the module behind each stage's `atmask <command>`
    "ingest": "components.ingest",
    "train": "components.train",
    "evaluate": "components.evaluate",
    "report": "components.report",
    "register": "components.register",
}


def _copy_repo(dest: Path, overrides: dict[str, Any]) -> Path:
    """The project's files (tracked + untracked, not ignored) in a fresh git repo, params overridden."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_file() and rel.split("/")[0] not in GENERATED:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    raw = yaml.safe_load((dest / "params.yaml").read_text())
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


def _head(repo: Path) -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
    ).stdout.strip()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `atmask`, `dvc`
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args],
        cwd=repo,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1500,
    )
    if check:
        assert result.returncode == 0, (
            f"dvc {' '.join(args)}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A copy of the repo on which the full DAG ran once with `dvc repro` (tiny data, tiny model)."""
    root = tmp_path_factory.mktemp("dvc")
    repo = _copy_repo(root / "repo", LOCAL_OVERRIDES)
    result = dvc(repo, "repro")
    assert ran_stages(result.stdout) == {
        "ingest",
        *(f"{stage}@{a}-0" for a in ABLATIONS for stage in ("train", "evaluate")),
        "report",
        "register",
    }
    yield repo
    shutil.rmtree(root, ignore_errors=True)  # gigabytes of checkpoints, DVC cache and MLflow artifacts


@pytest.mark.slow
@pytest.mark.integration
def test_repro_runs_the_whole_dag_and_leaves_every_output(reproduced: Path) -> None:
    table = (reproduced / "reports" / "ablations.md").read_text()
    for ablation in ABLATIONS:
        assert f"| {ablation} |" in table
        metrics = json.loads((reproduced / "runs" / ablation / "seed0" / "metrics.json").read_text())
        assert {"segm/AP", "segm/AP50", "segm/AP75", "bbox/AP", "boundary/AP"} <= set(metrics)
        assert (reproduced / "runs" / ablation / "seed0" / "model.pt").is_file()
    decision = json.loads((reproduced / "reports" / "registry.json").read_text())
    assert decision["decision"] in ("champion", "challenger") and str(decision["version"]) == "1"

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{reproduced / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(load_params(reproduced / "params.yaml").mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id], "tags.ablation != ''")
    assert sorted((r.data.tags["ablation"], r.data.tags["seed"]) for r in runs) == sorted(
        (a, "0") for a in ABLATIONS
    )
    lock = yaml.safe_load((reproduced / "dvc.lock").read_text())
    (data_out,) = lock["stages"]["ingest"]["outs"]
    for run in runs:
        assert {"segm_AP", "segm_AP50", "segm_AP75", "bbox_AP", "boundary_AP"} <= set(run.data.metrics)
        (data,) = run.inputs.dataset_inputs  # the DVC data version, as on the cluster (test_pipeline)
        assert (data.dataset.name, data.dataset.digest) == ("data/coco", data_out["md5"])
        assert run.data.tags["mlflow.source.type"] == "LOCAL"
        assert run.data.tags["mlflow.source.git.commit"].removesuffix("+dirty") == _head(reproduced)
    (study,) = client.search_runs([experiment.experiment_id], "tags.study = 'ablations'")
    assert {f"{a}/segm_AP_mean" for a in ABLATIONS} <= set(study.data.metrics)

    shown = json.loads(dvc(reproduced, "metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]
    assert {f"runs/{a}/seed0/metrics.json" for a in ABLATIONS} <= set(files)
    plots = json.loads(dvc(reproduced, "plots", "show", "--json").stdout)["data"]
    assert {f"runs/{a}/seed0/plots/threshold_sweep.csv" for a in ABLATIONS} <= set(plots)
    pictures = ("threshold_sweep.png", "pr_curves.png", "loss.png", "ablations.png")
    side_by_side = {f"reports/plots/{name}" for name in pictures}
    assert side_by_side <= set(plots)
    assert all((reproduced / p).read_bytes().startswith(b"\x89PNG") for p in side_by_side)
    assert not any(p.name.endswith(".tmp") for p in reproduced.rglob("*"))


@contextlib.contextmanager
def edited_params(
    repo: Path, *leftovers: str, repro_after: bool = True
) -> Iterator[tuple[dict[str, Any], Callable[[], None]]]:
    """params.yaml as a dict to edit (written back on entering the block); on leaving, the original file
    is restored, ``leftovers`` (run folders the edit created) removed, and the DAG brought back."""
    params = repo / "params.yaml"
    original = params.read_text()
    raw = yaml.safe_load(original)

    def write() -> None:
        params.write_text(yaml.safe_dump(raw, sort_keys=False))

    try:
        yield raw, write
    finally:
        params.write_text(original)
        for rel in leftovers:
            shutil.rmtree(repo / rel, ignore_errors=True)
        if repro_after:
            dvc(repo, "repro")  # back to the state the other tests expect


def _changed_stages(repo: Path) -> set[str]:
    return set(json.loads(dvc(repo, "status", "--json").stdout))


@pytest.mark.slow
@pytest.mark.integration
def test_second_repro_does_nothing_and_one_k_reruns_only_its_branch(reproduced: Path) -> None:
    assert "Data and pipelines are up to date" in dvc(reproduced, "status").stdout
    assert ran_stages(dvc(reproduced, "repro").stdout) == set()
    with edited_params(reproduced) as (raw, write):
        raw["ablations"]["atmask"]["k"] = 1.5
        write()
        rerun = ran_stages(dvc(reproduced, "repro").stdout)
        assert rerun == {"train@atmask-0", "evaluate@atmask-0", "report", "register"}


@pytest.mark.slow
@pytest.mark.integration
def test_only_the_selected_recipe_is_a_dependency(reproduced: Path) -> None:
    with edited_params(reproduced, repro_after=False) as (raw, write):
        raw["recipes"]["r101_fpn_coco"]["lr"] = 0.01  # not the selected recipe
        write()
        assert _changed_stages(reproduced) == set()
        raw["recipes"]["cpu_demo"]["lr"] = 0.01  # the selected one: every model trains again
        write()
        assert _changed_stages(reproduced) == {f"train@{a}-0" for a in ABLATIONS}
    assert _changed_stages(reproduced) == set()


@pytest.mark.slow
@pytest.mark.integration
def test_a_new_ablation_is_one_entry_in_params_yaml(reproduced: Path) -> None:
    with edited_params(reproduced, "runs/atmask_k3") as (raw, write):
        raw["ablations"]["atmask_k3"] = {"base": "atmask", "k": 3.0}
        write()
        rerun = ran_stages(dvc(reproduced, "repro").stdout)
        assert rerun == {"train@atmask_k3-0", "evaluate@atmask_k3-0", "report", "register"}
        table = (reproduced / "reports" / "ablations.md").read_text()
        assert "| atmask_k3 | ✓ | ✓ | ✓ | P2 | 3 |  | 1 |" in table


@pytest.mark.slow
@pytest.mark.integration
def test_a_new_seed_runs_only_its_pairs_and_the_report_gives_intervals(reproduced: Path) -> None:
    with edited_params(reproduced, "runs/baseline/seed1", "runs/atmask/seed1") as (raw, write):
        raw["ablations"] = {"baseline": {}, "atmask": {}}
        raw["train"]["seeds"] = [0, 1]
        write()
        rerun = ran_stages(dvc(reproduced, "repro").stdout)
        new = {f"{stage}@{a}-1" for a in ("baseline", "atmask") for stage in ("train", "evaluate")}
        assert rerun == new | {"report", "register"}
        table = (reproduced / "reports" / "ablations.md").read_text()
        atmask_row = next(line for line in table.splitlines() if line.startswith("| atmask |"))
        cells = [c.strip() for c in atmask_row.strip("|").split("|")]
        assert cells[7] == "2" and " ± " in cells[8]  # two seeds: mean ± std
        assert re.fullmatch(r"[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\]( n\.s\.)?", cells[-3])  # ΔAP [95% CI]


@pytest.mark.slow
@pytest.mark.integration
def test_push_and_pull_through_an_s3_remote(reproduced: Path, s3_server: str, s3_bucket: str) -> None:
    dvc(reproduced, "remote", "add", "s3remote", f"s3://{s3_bucket}/dvc-store")
    dvc(reproduced, "remote", "modify", "s3remote", "endpointurl", s3_server)
    config = (reproduced / ".dvc" / "config").read_text()
    assert "endpointurl" in config and os.environ["AWS_SECRET_ACCESS_KEY"] not in config  # env, not config
    dvc(reproduced, "push", "--remote", "s3remote")
    stored = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=s3_bucket, Prefix="dvc-store/")
    assert stored.get("KeyCount", 0) > 0

    outputs = [
        reproduced / "data" / "coco",
        *(reproduced / "runs" / a / "seed0" / "model.pt" for a in ABLATIONS),
    ]
    before = {p: _digest(p) for p in outputs}
    shutil.rmtree(reproduced / ".dvc" / "cache")
    for path in outputs:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    dvc(reproduced, "pull", "--remote", "s3remote")
    assert {p: _digest(p) for p in outputs} == before
    assert "Data and pipelines are up to date" in dvc(reproduced, "status").stdout


BAD_PARAMS = {
    "unknown ablation": ({"ablations.atmsk": {"k": 1.0}}, "ablations.atmsk: unknown ablation"),
    "typo'd key": ({"recipes.cpu_demo.itrations": 4}, "recipes.cpu_demo.itrations: unknown key"),
    "negative lr": ({"recipes.cpu_demo.lr": -0.02}, "recipes.cpu_demo.lr: must be > 0"),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_bad_params_stop_the_first_stage_naming_the_key(tmp_path: Path, case: str) -> None:
    overrides, message = BAD_PARAMS[case]
    repo = _copy_repo(tmp_path / "repo", {**LOCAL_OVERRIDES, **overrides})
    result = dvc(repo, "repro", check=False)
    assert result.returncode != 0
    assert ran_stages(result.stdout) == {"ingest"}
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (repo / "data").exists() and not (repo / "runs").exists()


def _imports(module: str, seen: set[str]) -> set[str]:
    """The project modules ``module`` imports, transitively (by reading the source, not importing it)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    if module in seen or not path.is_file():
        return seen
    seen.add(module)
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        for name in names:
            if name.split(".")[0] in ("components", "model"):
                _imports(name, seen)
    return seen


@pytest.mark.parametrize("stage", list(STAGE_MODULES))
def test_stage_code_deps_are_exactly_the_modules_it_imports(stage: str) -> None:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    code = {d for d in spec["deps"] if d.endswith(".py")}
    needed = {m.replace(".", "/") + ".py" for m in _imports(STAGE_MODULES[stage], set())}
    needed = {path for path in needed if (ROOT / path).is_file()}
    assert sorted(needed - code) == [], f"dvc.yaml stage {stage!r} lacks these deps"
    assert sorted(code - needed) == [], f"dvc.yaml stage {stage!r} depends on code it does not read"
    assert f"atmask {stage}" in spec["cmd"]
