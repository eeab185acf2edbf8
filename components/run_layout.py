"""File names inside a run folder (``runs/<name>/``) and an ingested dataset folder, shared by every step.

Training writes the model, its log and loss curve, the MLflow run reference and periodic checkpoints;
evaluation adds metrics, what was evaluated, detections, ``plots/`` and ``samples/``.
"""

from pathlib import Path

MODEL_FILE = "model.pt"  # weights + the config and categories that built them (components.checkpoint)
CHECKPOINT_DIR = "checkpoints"  # ckpt_<iteration>.pt + .sha256 sidecars
TRAIN_LOG = "train_log.json"  # per-log-step losses, lr, images/s, and a summary
LOSS_CSV = Path("plots") / "loss.csv"  # a DVC plot: step + one column per loss
MLFLOW_RUN_FILE = "mlflow_run.json"  # run id, experiment id, tracking URI (components.tracking)
METRICS_FILE = "metrics.json"  # flat {key: number}, keys in components.evaluate.metric_keys
INFO_FILE = "eval_info.json"  # what was evaluated: ablation, head switches, split, data checksum, ...

MANIFEST_FILE = "manifest.json"  # in an ingested dataset: splits, counts, content checksum
