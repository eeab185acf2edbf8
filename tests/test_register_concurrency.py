"""Several ``atmask register`` processes at once against a real ``mlflow server``: after every round the
champion is the best eligible version, and each version that lost is ``challenger`` with its reason.

MLflow has no compare-and-set on aliases; before ``register.converge`` the slowest writer won even with a
worse model. Models are one tiny untrained network saved with a different tag each (distinct sha256), and
the scores are written into each run's metrics.json, so the expected outcome of every round is known.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
import yaml
from fixtures_eval import TINY_MODEL

from components.checkpoint import save_model
from components.params import load_params
from components.promote import promote
from components.register import CHALLENGER, CHAMPION, ELIGIBLE_TAG, converge
from model.builder import build_model
from model.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
WRITERS = 4
# (candidate score, its run set's baseline score or None) per writer; min_improvement 0.0
ROUNDS: list[list[tuple[float, float | None]]] = [
    [(0.30, None), (0.50, None), (0.40, None), (0.20, None)],  # first champion: 0.50
    [(0.45, None), (0.62, None), (0.55, None), (0.90, 0.95)],  # 0.90 does not beat its baseline: 0.62
    [(0.58, None), (0.61, None), (0.10, None), (0.40, None)],  # nobody beats 0.62: unchanged
    [(0.70, None), (0.80, None), (0.75, None), (0.65, None)],  # 0.80
]


@pytest.fixture(scope="module")
def base_payload(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("tiny-model") / "model.pt"
    torch.manual_seed(0)
    cfg = ModelConfig.for_ablation("atmask", num_classes=2, **TINY_MODEL)
    save_model(path, build_model(cfg), cfg, [{"id": 1, "name": "thing", "supercategory": ""}])
    return torch.load(path, weights_only=True)


def _run(folder: Path, payload: dict[str, Any], tag: str, ablation: str, score: float) -> None:
    folder.mkdir(parents=True)
    torch.save({**payload, "variant": tag}, folder / "model.pt")  # same weights, its own sha256
    (folder / "metrics.json").write_text(json.dumps({"segm/AP": score, "bbox/AP": score / 2}))
    (folder / "eval_info.json").write_text(json.dumps({"ablation": ablation, "data_checksum": "test-data"}))


@pytest.fixture
def registry_params(mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["register"].update(model_name=f"race-{tmp_path.name}", min_improvement=0.0)
    raw["mlflow"]["experiment"] = f"race-{tmp_path.name}"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _start_round(root: Path, scores, payload, params: Path, server: str) -> list[subprocess.Popen]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": server, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = []
    for k, (score, baseline) in enumerate(scores):
        runs = root / f"writer{k}" / "runs"
        _run(runs / "atmask", payload, f"{root.name}-{k}", "atmask", score)
        if baseline is not None:
            _run(runs / "baseline", payload, f"{root.name}-{k}-base", "baseline", baseline)
        argv = ["register", "--runs", str(runs), "--params", str(params), "--candidate", "atmask"]
        argv += ["--out", str(root / f"writer{k}" / "registry.json")]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "components.cli", *argv],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    return procs


@pytest.mark.slow
@pytest.mark.integration
def test_concurrent_registrations_converge_to_the_best_eligible_version(
    registry_params: Path, base_payload: dict[str, Any], mlflow_server: str, tmp_path: Path
) -> None:
    name = load_params(registry_params).register.model_name
    client = mlflow.MlflowClient()
    best_so_far = None
    races = 0  # writers that passed the gate but were beaten by a concurrent one
    for number, scores in enumerate(ROUNDS):
        root = tmp_path / f"round{number}"
        procs = _start_round(root, scores, base_payload, registry_params, mlflow_server)
        outputs = [p.communicate(timeout=600)[0].decode() for p in procs]
        assert [p.returncode for p in procs] == [0] * WRITERS, "\n".join(o[-2000:] for o in outputs)
        decisions = [json.loads((root / f"writer{k}" / "registry.json").read_text()) for k in range(WRITERS)]
        versions = [d["version"] for d in decisions]
        assert len(set(versions)) == WRITERS  # one new version per writer

        eligible = [s for s, baseline in scores if baseline is None or s > baseline]
        round_best = max(eligible)
        winner = None if best_so_far is not None and round_best <= best_so_far else round_best
        best_so_far = max(best_so_far or 0.0, round_best)
        champion = client.get_model_version_by_alias(name, CHAMPION)
        assert float(champion.tags["metric.segm_AP"]) == best_so_far, f"round {number}: {decisions}"

        for (score, baseline), d in zip(scores, decisions, strict=True):
            mv = client.get_model_version(name, d["version"])
            assert mv.tags[ELIGIBLE_TAG] == str(baseline is None or score > baseline).lower()
            assert mv.tags["gate"] == d["reason"]
            if score == winner:
                assert d["decision"] == CHAMPION and d["version"] == champion.version
                assert "superseded_by" not in mv.tags
            elif d["decision"] == CHAMPION:  # champion when it returned; a racer finishing later beat it
                # names the racer that displaced it (which a third racer may have displaced in turn)
                by = re.match(
                    r"v(\d+) \(segm/AP ([0-9.]+)\), registered at the same time", mv.tags["superseded_by"]
                )
                assert by and by.group(1) in versions and float(by.group(2)) > score, mv.tags["superseded_by"]
            elif baseline is not None and score <= baseline:
                assert "does not beat the baseline run" in d["reason"]
            elif "lost the race" not in d["reason"]:  # it read a champion it did not beat
                assert "does not beat champion" in d["reason"], d["reason"]
            assert d["decision"] == CHAMPION or d["version"] != champion.version
        losers = {d["version"] for d, (s, _) in zip(decisions, scores, strict=True) if s != winner}
        assert client.get_model_version_by_alias(name, CHALLENGER).version in losers
        races += sum(
            "lost the race" in d["reason"]
            or "superseded_by" in client.get_model_version(name, d["version"]).tags
            for d in decisions
        )
    assert len(client.search_model_versions(f"name = '{name}'")) == WRITERS * len(ROUNDS)
    print(f"{races} writer(s) passed the gate and lost the race")  # > 0: the writers did overlap


@pytest.mark.slow
@pytest.mark.integration
def test_converge_repairs_a_lost_race_and_respects_a_manual_promotion(
    registry_params: Path, mlflow_server: str
) -> None:
    """The interleaving the race produces, written by hand: the worse version's alias write came last."""
    params = load_params(registry_params)
    name = params.register.model_name
    client = mlflow.MlflowClient()
    client.create_registered_model(name)
    run = client.create_run(mlflow.set_experiment(params.mlflow.experiment).experiment_id)

    def version(score: float, eligible: bool = True) -> str:
        tags = {"metric.segm_AP": repr(score), ELIGIBLE_TAG: str(eligible).lower()}
        source = f"runs:/{run.info.run_id}/model"
        return client.create_model_version(name, source, run_id=run.info.run_id, tags=tags).version

    better, worse, ineligible = version(0.7), version(0.6), version(0.9, eligible=False)
    client.set_registered_model_alias(name, CHAMPION, worse)
    assert converge(client, name, "segm/AP", 0.0)[0] == (better, 0.7)
    assert client.get_model_version_by_alias(name, CHAMPION).version == better != ineligible
    assert converge(client, name, "segm/AP", 0.0)[0] == (better, 0.7)  # stable: nothing moves
    assert converge(client, name, "segm/AP", 0.05)[0] == (better, 0.7)

    promote(params, worse)  # by hand: the older, better version must not come back
    assert converge(client, name, "segm/AP", 0.0)[0] == (worse, 0.6)
    newer = version(0.65)
    assert converge(client, name, "segm/AP", 0.1)[0] == (worse, 0.6)  # within the margin: stays
    assert converge(client, name, "segm/AP", 0.0)[0] == (newer, 0.65)
