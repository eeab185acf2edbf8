"""File names inside a run folder (``runs/<name>/``), shared by train, evaluate, report and register.

Training writes ``model.pt`` (:mod:`components.checkpoint`), ``train_log.json``, ``plots/loss.csv`` and
``mlflow_run.json`` (:mod:`components.tracking`); evaluation adds the two files below, detections,
``plots/`` and ``samples/``.
"""

METRICS_FILE = "metrics.json"  # flat {key: number}, keys in components.evaluate.metric_keys
INFO_FILE = "eval_info.json"  # what was evaluated: ablation, head switches, split, data checksum, ...
