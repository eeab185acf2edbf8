"""``atmask report``: the paper's ablation tables (Tables 2-5) from measured runs only.

Rows are ablations (in params.yaml order), with the component ticks of the paper's tables (threshold
branch, P2T, T2P fusion, Rt source, k), the number of runs, and mask AP / AP50 / AP75 / APs / APm / APl,
box AP and boundary AP. Runs sharing an ablation (several seeds) give ``mean ± std`` (sample standard
deviation, n - 1). ``ΔAP`` / ``Δboundary`` are the differences of the means against the ``baseline`` row.

Sources: ``runs/*/metrics.json`` + ``eval_info.json`` (written by ``atmask evaluate``), or the MLflow runs of
an experiment (``--experiment``: metrics ``segm_AP`` ..., tag ``ablation`` and ``head.*`` set by evaluate).

Outputs: ``reports/ablations.md`` (percent, one decimal, like the paper) and ``reports/ablations.csv``
(fractions at full precision: ``<metric>_mean``, ``<metric>_std``), the Markdown table on stdout, and
(from run folders) side-by-side pictures in ``reports/plots/`` (:mod:`components.report_plots`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components import report_plots
from components.errors import UserError
from components.io import write_text_atomic
from components.params import Params, load_params
from components.run_layout import INFO_FILE, METRICS_FILE
from components.tracking import check_reachable, mlflow_key, tracking_uri

COLUMNS = ("segm/AP", "segm/AP50", "segm/AP75", "segm/APs", "segm/APm", "segm/APl", "bbox/AP", "boundary/AP")
HEADERS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "box AP", "boundary AP")
DELTAS = ("segm/AP", "boundary/AP")


@dataclass
class Row:
    ablation: str
    head: dict[str, Any]
    values: dict[str, list[float]] = field(default_factory=dict)  # metric -> one value per run
    sources: list[str] = field(default_factory=list)

    def mean(self, key: str) -> float | None:
        vals = sorted(self.values.get(key, []))  # sorted: the same sum whatever order the runs come in
        return statistics.fmean(vals) if vals and all(v >= 0 for v in vals) else None

    def std(self, key: str) -> float | None:
        vals = sorted(self.values.get(key, []))
        return statistics.stdev(vals) if len(vals) > 1 and all(v >= 0 for v in vals) else None


# ------------------------------------------------------------------ sources


def runs_from_folder(runs_dir: Path) -> list[tuple[str, dict[str, Any], dict[str, float]]]:
    """``(source, head tags incl. ablation, metrics)`` for every evaluated run folder."""
    if not runs_dir.is_dir():
        raise UserError(f"{runs_dir}: runs folder not found; pass --runs with the folder holding runs/<name>")
    found = []
    for run in sorted(p for p in runs_dir.iterdir() if (p / METRICS_FILE).is_file()):
        info_path = run / INFO_FILE
        try:
            metrics = json.loads((run / METRICS_FILE).read_text(encoding="utf-8"))
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(
                f"{run}: unreadable {METRICS_FILE} / {INFO_FILE} ({err}); re-run 'atmask evaluate'"
            ) from None
        found.append((str(run), info["head"], metrics))
    return found


def runs_from_mlflow(experiment: str, params: Params) -> list[tuple[str, dict[str, Any], dict[str, float]]]:
    import mlflow

    uri = tracking_uri(params)
    check_reachable(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"MLflow at {uri}: no experiment named {experiment!r}; check --experiment")
    found = []
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="tags.ablation != ''",
        max_results=5000,
        order_by=["attributes.start_time ASC"],
    )
    for run in runs:
        data = run.data
        if mlflow_key("segm/AP") not in data.metrics:
            continue
        head = {k: v for k, v in data.tags.items() if k == "ablation" or k.startswith("head.")}
        metrics = {key: data.metrics[mlflow_key(key)] for key in COLUMNS if mlflow_key(key) in data.metrics}
        found.append((f"mlflow run {run.info.run_id}", head, metrics))
    return found


def group(runs: list[tuple[str, dict[str, Any], dict[str, float]]], order: list[str]) -> list[Row]:
    rows: dict[str, Row] = {}
    for source, head, metrics in runs:
        tags = {k: str(v) for k, v in head.items()}
        row = rows.setdefault(tags["ablation"], Row(tags["ablation"], tags))
        row.sources.append(source)
        for key in COLUMNS:
            if key in metrics:
                row.values.setdefault(key, []).append(float(metrics[key]))
    rank = {name: i for i, name in enumerate(order)}
    return sorted(rows.values(), key=lambda r: (rank.get(r.ablation, len(rank)), r.ablation))


# ------------------------------------------------------------------ rendering


def _flag(value: Any) -> bool:
    return str(value).lower() == "true"


def ticks(head: dict[str, Any]) -> list[str]:
    """Thr, P2T, T2P, Rt source, k, as the paper's tables show them."""
    if not _flag(head.get("head.threshold_branch")):
        return ["", "", "", "", ""]
    mark = [
        "✓" if _flag(head.get(f"head.{k}")) else "" for k in ("threshold_branch", "p2t_fusion", "t2p_fusion")
    ]
    rt = "P2" if head.get("head.rt_source") == "p2" else "P2~P5"
    return [*mark, rt, f"{float(head.get('head.k', 0)):g}"]


def _pct(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def _delta(row: Row, base: Row | None, key: str) -> float | None:
    if base is None or row.mean(key) is None or base.mean(key) is None:
        return None
    return row.mean(key) - base.mean(key)


def markdown(rows: list[Row]) -> str:
    base = next((r for r in rows if r.ablation == "baseline"), None)
    header = ["ablation", "Thr", "P2T", "T2P", "Rt", "k", "runs", *HEADERS, "ΔAP", "Δboundary"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.ablation, *ticks(row.head), str(len(row.sources))]
        cells += [_pct(row.mean(k), row.std(k)) for k in COLUMNS]
        for key in DELTAS:
            d = _delta(row, base, key)
            cells.append("–" if d is None or row is base else f"{100 * d:+.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[Row]) -> str:
    base = next((r for r in rows if r.ablation == "baseline"), None)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    head_keys = ["threshold_branch", "p2t_fusion", "t2p_fusion", "rt_source", "k"]
    writer.writerow(
        ["ablation", *head_keys, "runs", *(f"{k}_{s}" for k in COLUMNS for s in ("mean", "std"))]
        + [f"delta_{k}" for k in DELTAS]
    )
    for row in rows:
        cells: list[Any] = [
            row.ablation,
            *(row.head.get(f"head.{k}", "") for k in head_keys),
            len(row.sources),
        ]
        for key in COLUMNS:
            cells += [_num(row.mean(key)), _num(row.std(key))]
        cells += [_num(_delta(row, base, key)) for key in DELTAS]
        writer.writerow(cells)
    return out.getvalue()


def _num(value: float | None) -> str:
    return "" if value is None else repr(float(value))


# ------------------------------------------------------------------ the step


def report(
    params: Params,
    runs_dir: str | Path | None = "runs",
    experiment: str | None = None,
    out_dir: str | Path = "reports",
) -> list[Row]:
    """Build the ablation table from run folders (or an MLflow experiment) and write it to ``out_dir``."""
    if experiment:
        runs, where = runs_from_mlflow(experiment, params), f"MLflow experiment {experiment!r}"
    else:
        runs, where = runs_from_folder(Path(runs_dir)), f"{runs_dir}"
    if not runs:
        raise UserError(f"{where}: no evaluated runs found; run 'atmask evaluate' on the trained runs first")
    rows = group(runs, list(params.ablations))
    if not experiment:  # run folders of ablations no longer in params.yaml are left out, and said so
        stale = [r.ablation for r in rows if r.ablation not in params.ablations]
        if stale:
            print(f"atmask report: note: skipping runs of {', '.join(stale)} (not under 'ablations:')")
        rows = [r for r in rows if r.ablation in params.ablations]
    md, table = markdown(rows), csv_text(rows)
    title = (
        f"# Ablations (measured; source: {where})\n\nMask AP in %; mean ± std over runs where runs > 1.\n\n"
    )
    out_dir = Path(out_dir)
    write_text_atomic(out_dir / "ablations.csv", table)
    write_text_atomic(out_dir / "ablations.md", title + md)
    if not experiment:
        report_plots.render({r.ablation: [Path(s) for s in r.sources] for r in rows}, out_dir / "plots")
    print(md, end="")
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runs", type=Path, default=Path("runs"), help="folder of evaluated runs (default: runs)"
    )
    parser.add_argument("--experiment", help="read the runs from this MLflow experiment instead of --runs")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="output folder (default: reports)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    report(params, args.runs, args.experiment, args.out)
    print(f"wrote {args.out / 'ablations.md'} and {args.out / 'ablations.csv'}")
    return 0
