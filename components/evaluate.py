"""``atmask evaluate``: COCO bbox/segm/boundary AP, threshold sweep and pictures for one trained run.

Outputs (all in the run folder, each written atomically; nothing is left behind on failure):

- ``metrics.json``: flat ``{key: number}`` with the keys in :func:`metric_keys` (documented in the README):
  ``{bbox,segm,boundary}/{AP,AP50,AP75,APs,APm,APl,AR1,AR10,AR100,ARs,ARm,ARl}``,
  ``threshold_sweep/<t>/segm_AP`` for each fixed threshold t on P, ``threshold_sweep/adaptive/segm_AP``
  (ATMask only: P >= T), ``eval/num_images``, ``eval/num_detections``. COCO's -1 means "nothing to measure"
  (e.g. APl when the split has no large objects).
- ``eval_info.json``: what was evaluated (ablation, head, split, data checksum, evaluator, model sha256).
- ``detections_<split>.json``: COCO results (RLE masks from ``masks >= 0.5``).
- ``plots/``: threshold sweep and PR curves (PNG + CSV + JSON); ``samples/``: overlays and P/T/B maps.

The same metrics go to the training run in MLflow (``runs/<name>/mlflow_run.json``) with '/' -> '_'
(``segm/AP`` -> ``segm_AP``), plots and results as artifacts under ``evaluation/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from components import plots
from components.checkpoint import MODEL_FILE, load_trained_model, sha256_file
from components.coco_eval import IOU_TYPES, STAT_NAMES, EvalResult, check_results_match, evaluate_coco
from components.distributed import resolve_device
from components.errors import UserError
from components.eval_inference import Inference, Split, check_categories, load_split, run_inference
from components.io import write_json_atomic
from components.params import EvaluateParams, Params, load_params
from components.run_layout import INFO_FILE, METRICS_FILE, TRAIN_LOG
from components.tracking import check_reachable, mlflow_key, read_mlflow_run, tracking_uri
from model.binarize import differentiable_binarization
from model.config import ModelConfig
from model.inference import predict_with_maps

SAMPLE_SCORE_THRESHOLD = 0.5  # detections drawn in pictures


def sweep_key(threshold: float | str) -> str:
    name = threshold if isinstance(threshold, str) else f"{threshold:g}"
    return f"threshold_sweep/{name}/segm_AP"


def metric_keys(fixed_thresholds: list[float], atmask: bool) -> list[str]:
    """The stable key set of ``metrics.json`` for a run with these settings."""
    keys = [f"{iou}/{stat}" for iou in IOU_TYPES for stat in STAT_NAMES]
    keys += [sweep_key(t) for t in fixed_thresholds] + ([sweep_key("adaptive")] if atmask else [])
    return [*keys, "eval/num_images", "eval/num_detections"]


# ------------------------------------------------------------------ metrics


def coco_metrics(
    gt: dict[str, Any], detections: list[dict[str, Any]], ev: EvaluateParams
) -> tuple[dict[str, float], dict[str, EvalResult]]:
    """``{"<iou_type>/<stat>": value}`` and the full results, for bbox, segm and boundary."""
    results = {
        iou_type: evaluate_coco(
            gt,
            detections,
            iou_type,
            evaluator=ev.evaluator,
            boundary_dilation_ratio=ev.boundary_dilation_ratio,
        )
        for iou_type in IOU_TYPES
    }
    metrics = {f"{t}/{stat}": value for t, res in results.items() for stat, value in res.stats.items()}
    return metrics, results


def compute_metrics(split: Split, inf: Inference, params: Params, atmask: bool) -> tuple[dict, dict]:
    """``(metrics.json dict, {iou_type: EvalResult})`` of the final detections plus the threshold sweep."""
    ev = params.evaluate
    final = inf.results.get("final", [])
    metrics, results = coco_metrics(split.gt, final, ev)
    variants = [f"{t:g}" for t in ev.fixed_thresholds] + (["adaptive"] if atmask else [])
    for name in variants:
        res = evaluate_coco(split.gt, inf.results.get(name, []), "segm", evaluator=ev.evaluator)
        metrics[sweep_key(name)] = res.stats["AP"]
    metrics["eval/num_images"] = float(len(split.gt["images"]))
    metrics["eval/num_detections"] = float(len(final))
    return metrics, results


# ------------------------------------------------------------------ pictures


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def write_samples(
    out_dir: Path, inf: Inference, cfg: ModelConfig, cats: list[dict[str, Any]], baseline: Any = None
) -> None:
    """Per sample image: ``<id>_overlay.png``; for ATMask also ``<id>_maps.png`` (P, T, B, P>=0.5, P>=T and,
    given the ``baseline`` model, its masks)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [c["name"] for c in cats]
    for image_id, sample in sorted(inf.samples.items()):
        image = _to_uint8(sample["image"])
        keep = sample["scores"] >= SAMPLE_SCORE_THRESHOLD
        masks = (sample["masks"][keep, 0] >= 0.5).numpy()
        captions = [
            f"{names[int(lab) - 1]} {float(s):.2f}"
            for lab, s in zip(sample["labels"][keep], sample["scores"][keep], strict=True)
        ]
        drawn = plots.overlay(image, masks, sample["boxes"][keep].numpy(), captions)
        Image.fromarray(drawn).save(out_dir / f"{image_id}_overlay.png")
        if cfg.is_atmask and len(sample["scores"]) > 0:
            write_maps(out_dir / f"{image_id}_maps.png", image, sample, cfg.head.k, baseline)


def write_maps(path: Path, image: np.ndarray, sample: dict[str, Any], k: float, baseline: Any = None) -> None:
    """The top-scoring detection's P, T and B maps next to the fixed (P >= 0.5) and adaptive masks, and
    the baseline model's masks (score >= 0.5) on the same image when a baseline run is at hand."""
    top = int(torch.argmax(sample["scores"]))
    prob, thr = sample["prob_masks"][top, 0], sample["thr_masks"][top, 0]
    b = differentiable_binarization(prob, thr, k)
    panels = [
        ("P (probability)", prob.numpy(), True),
        ("T (threshold)", thr.numpy(), True),
        (f"B = sigmoid({k:g}(P-T))", b.numpy(), True),
        ("mask P >= 0.5 (fixed)", plots.overlay(image, (prob >= 0.5).numpy()[None]), False),
        ("mask P >= T (adaptive)", plots.overlay(image, (prob >= thr).numpy()[None]), False),
    ]
    if baseline is not None:
        out = predict_with_maps(baseline, [sample["image"]])[0]
        masks = (out["masks"][out["scores"] >= SAMPLE_SCORE_THRESHOLD, 0] >= 0.5).numpy()
        panels.append(("baseline (Mask R-CNN) masks", plots.overlay(image, masks), False))
    plots.maps_figure(path, image, panels)


def write_plots(out_dir: Path, metrics: dict[str, float], results: dict[str, EvalResult], title: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = "threshold_sweep/"
    sweep = {k[len(prefix) : -len("/segm_AP")]: v for k, v in metrics.items() if k.startswith(prefix)}
    plots.threshold_sweep_plot(out_dir, sweep, title)
    plots.pr_curves_plot(out_dir, results)


# ------------------------------------------------------------------ MLflow


def log_to_mlflow(
    record: dict[str, Any], params: Params, metrics: dict[str, float], stage: Path, cfg
) -> None:
    """Metrics ('/' -> '_'), ablation tags and the evaluation files as artifacts under ``evaluation/``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = record.get("tracking_uri") or tracking_uri(params)
    check_reachable(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = record["run_id"]
    try:
        client.get_run(run_id)
        client.log_batch(
            run_id,
            metrics=[
                mlflow.entities.Metric(mlflow_key(k), v, int(time.time() * 1000), 0)
                for k, v in metrics.items()
            ],
            tags=[mlflow.entities.RunTag(k, str(v)) for k, v in ablation_tags(cfg).items()],
        )
        client.log_artifacts(run_id, str(stage), artifact_path="evaluation")
    except MlflowException as err:
        raise UserError(
            f"MLflow at {uri}: cannot log to run {run_id} ({err.message.splitlines()[0]})"
        ) from None


def ablation_tags(cfg: ModelConfig) -> dict[str, Any]:
    head = cfg.head
    return {
        "ablation": cfg.ablation,
        "head.threshold_branch": head.threshold_branch,
        "head.p2t_fusion": head.p2t_fusion,
        "head.t2p_fusion": head.t2p_fusion,
        "head.rt_source": head.rt_source,
        "head.k": head.k,
        "head.threshold_target": head.threshold_target,
        "head.fusion": head.fusion,
    }


# ------------------------------------------------------------------ the step


def evaluate(
    params: Params,
    run_dir: str | Path,
    data_dir: str | Path,
    split: str | None = None,
    device: str = "auto",
) -> dict[str, float]:
    """Evaluate ``run_dir/model.pt`` on ``data_dir``'s ``split``; write and log everything; return metrics.

    ``device``: ``auto`` (the GPU when there is one), ``cpu`` or ``cuda``.
    """
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    dev = resolve_device(device)
    split = split or params.evaluate.split
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run folder not found; pass --run runs/<name> of a trained run")
    model_path = run_dir / MODEL_FILE
    model, cfg, cats = load_trained_model(model_path, dev)
    data = load_split(data_dir, split)
    check_categories(cats, data.gt, model_path, data.annotations)
    record = read_mlflow_run(run_dir)
    if record is not None:
        check_reachable(record.get("tracking_uri") or tracking_uri(params))
    inf = run_inference(model, cfg, cats, data, params, dev)
    check_results_match(data.gt, inf.results.get("final", []), str(data.annotations))
    metrics, results = compute_metrics(data, inf, params, cfg.is_atmask)
    info = eval_info(cfg, data, split, params, model_path, inf) | {"seed": training_seed(run_dir)}
    with staging(run_dir) as stage:
        write_outputs(stage, run_dir, metrics, results, info, inf, cfg, cats, split)
        if record is not None:
            log_to_mlflow(record, params, metrics, stage, cfg)
        else:
            print(f"atmask evaluate: note: {run_dir}/mlflow_run.json not found; metrics not logged to MLflow")
        publish(stage, run_dir)
    return metrics


def eval_info(
    cfg: ModelConfig, data: Split, split: str, params: Params, model_path: Path, inf: Inference
) -> dict:
    return {
        "ablation": cfg.ablation,
        "head": ablation_tags(cfg),
        "split": split,
        "annotations": str(data.annotations),
        "data_checksum": data.checksum,
        "evaluator": params.evaluate.evaluator,
        "boundary_dilation_ratio": params.evaluate.boundary_dilation_ratio,
        "model_sha256": sha256_file(model_path),
        "inference_seconds": round(inf.seconds, 3),
        "metric_keys": metric_keys(params.evaluate.fixed_thresholds, cfg.is_atmask),
    }


def training_seed(run_dir: Path) -> int | None:
    """The seed the run was trained with (its train_log.json summary), None when unknown."""
    try:
        summary = json.loads((run_dir / TRAIN_LOG).read_text(encoding="utf-8"))["summary"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    seed = summary.get("seed") if isinstance(summary, dict) else None
    return seed if isinstance(seed, int) else None


def baseline_for_pictures(run_dir: Path, cfg: ModelConfig, cats: list[dict[str, Any]]) -> Any:
    """The ``baseline`` run of the same seed (``runs/baseline/seed<k>``) for side-by-side pictures, if
    trained on the same categories; else None."""
    path = run_dir.parent.parent / "baseline" / run_dir.name / MODEL_FILE
    if not cfg.is_atmask or not path.is_file():
        return None
    try:
        model, base_cfg, base_cats = load_trained_model(path)
    except UserError as err:
        print(f"atmask evaluate: note: baseline pictures skipped ({err})")
        return None
    return model if not base_cfg.is_atmask and base_cats == cats else None


def write_outputs(
    stage: Path, run_dir: Path, metrics, results, info, inf: Inference, cfg, cats, split: str
) -> None:
    write_json_atomic(stage / METRICS_FILE, metrics)
    write_json_atomic(stage / INFO_FILE, info)
    write_json_atomic(stage / f"detections_{split}.json", inf.results.get("final", []), indent=None)
    write_plots(stage / "plots", metrics, results, f"{cfg.ablation}: mask AP by binarization")
    write_samples(stage / "samples", inf, cfg, cats, baseline_for_pictures(run_dir, cfg, cats))


@contextlib.contextmanager
def staging(run_dir: Path) -> Iterator[Path]:
    """A hidden temporary folder inside the run folder, removed whatever happens."""
    stage = Path(tempfile.mkdtemp(prefix=".evaluate-", dir=run_dir))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


SHARED_DIRS = ("plots",)  # training writes plots/loss.csv there too: merge, never replace


def publish(stage: Path, run_dir: Path) -> None:
    """Move the staged outputs into the run folder: files by rename; folders replace the old ones, except
    the shared ``plots/``, where only the files evaluation wrote are replaced."""
    for item in sorted(stage.iterdir()):
        target = run_dir / item.name
        if item.is_dir() and item.name in SHARED_DIRS:
            target.mkdir(exist_ok=True)
            publish(item, target)
        elif item.is_dir() and target.exists():
            old = run_dir / f".{item.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(item, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(item, target)


# ------------------------------------------------------------------ CLI


def evaluate_results(params: Params, results_path: Path, data_dir: Path, split: str | None = None) -> dict:
    """bbox/segm/boundary metrics of an existing COCO results file (no inference, nothing written)."""
    data = load_split(data_dir, split or params.evaluate.split)
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{results_path}: cannot read a COCO results JSON ({err})") from None
    if not isinstance(results, list):
        raise UserError(f"{results_path}: expected a COCO results list of detections")
    check_results_match(data.gt, results, str(results_path))
    return coco_metrics(data.gt, results, params.evaluate)[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, help="run folder with model.pt (runs/<name>)")
    parser.add_argument("--data", required=True, type=Path, help="ingested COCO folder (data/coco)")
    parser.add_argument("--split", help="split to evaluate (default: params evaluate.split)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: the GPU if there is one"
    )
    parser.add_argument(
        "--results",
        type=Path,
        help="score an existing COCO results JSON instead of a run; prints the metrics as JSON, writes nothing",
    )


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    if args.results is not None:
        print(
            json.dumps(
                evaluate_results(params, args.results, args.data, args.split), indent=1, sort_keys=True
            )
        )
        return 0
    if args.run is None:
        raise UserError("give --run runs/<name> (or --results FILE to score a results file)")
    metrics = evaluate(params, args.run, args.data, args.split, args.device)
    for key in ("segm/AP", "segm/AP50", "segm/AP75", "bbox/AP", "boundary/AP"):
        print(f"{key:<14} {metrics[key]:.4f}")
    print(f"wrote {Path(args.run) / METRICS_FILE}")
    return 0
