"""``atmask report``: the paper's ablation tables (Tables 2-5) from measured runs only, over seeds.

Rows are ablations (in params.yaml order), with the component ticks of the paper's tables (threshold
branch, P2T, T2P, Rt source, k, and the threshold target where it is not the default), the seeds each row
has, and mask AP / AP50 / AP75 / APs / APm / APl, box AP and boundary AP as ``mean ± std`` over seeds
(sample standard deviation). ``ΔAP``, ``ΔAP75`` and ``Δboundary`` are paired differences to the
``baseline`` on the same seeds with a 95% t-interval over seeds (:mod:`components.paired`); ``n.s.`` marks
an interval that contains 0.

Sources: ``runs/**/metrics.json`` + ``eval_info.json`` (written by ``atmask evaluate``; the run folders are
``runs/<ablation>/seed<k>``), or the MLflow runs of an experiment (``--experiment``: metrics ``segm_AP``
..., tags ``ablation``, ``seed`` and ``head.*``; the latest run of each (ablation, seed) counts).

Outputs: ``reports/ablations.md`` (percent, one decimal, like the paper), ``reports/ablations.csv``
(fractions at full precision), the Markdown table on stdout, side-by-side pictures in ``reports/plots/``
(:mod:`components.report_plots`; from run folders), and, unless ``--no-mlflow``, a ``study`` run in the
MLflow experiment holding the table's numbers as metrics and the files as artifacts.
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
from components.paired import Interval, paired_difference
from components.params import Params, load_params
from components.run_layout import INFO_FILE, METRICS_FILE
from components.tracking import check_reachable, mlflow_key, tracking_uri

COLUMNS = ("segm/AP", "segm/AP50", "segm/AP75", "segm/APs", "segm/APm", "segm/APl", "bbox/AP", "boundary/AP")
HEADERS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "box AP", "boundary AP")
DELTAS = {"segm/AP": "ΔAP", "segm/AP75": "ΔAP75", "boundary/AP": "Δboundary"}
HEAD_KEYS = ("threshold_branch", "p2t_fusion", "t2p_fusion", "rt_source", "k", "threshold_target", "fusion")


@dataclass(frozen=True)
class Run:
    source: str
    tags: dict[str, str]  # ablation and head.* switches
    seed: int | None
    metrics: dict[str, float]


@dataclass
class Row:
    ablation: str
    head: dict[str, str]
    runs: dict[int, Run] = field(default_factory=dict)  # by seed (unknown seeds get negative keys)

    def values(self, key: str) -> dict[int, float]:
        """``{seed: value}``; COCO's -1 ("nothing to measure") is left out."""
        found = {s: float(r.metrics[key]) for s, r in self.runs.items() if key in r.metrics}
        return {s: v for s, v in found.items() if v >= 0}

    @property
    def seeds(self) -> list[int]:
        return sorted(s for s in self.runs if s >= 0)

    def mean(self, key: str) -> float | None:
        vals = sorted(self.values(key).values())  # sorted: the same sum whatever order the runs come in
        return statistics.fmean(vals) if vals and len(vals) == len(self.runs) else None

    def std(self, key: str) -> float | None:
        vals = sorted(self.values(key).values())
        return statistics.stdev(vals) if len(vals) > 1 and len(vals) == len(self.runs) else None

    def delta(self, base: Row | None, key: str) -> Interval | None:
        if base is None or base is self:
            return None
        paired = {s: v for s, v in self.values(key).items() if s >= 0}
        return paired_difference(paired, {s: v for s, v in base.values(key).items() if s >= 0})


# ------------------------------------------------------------------ sources


def runs_from_folder(runs_dir: Path) -> list[Run]:
    """Every evaluated run folder below ``runs_dir`` (``<ablation>/seed<k>``, or flat ``<name>``)."""
    if not runs_dir.is_dir():
        raise UserError(f"{runs_dir}: runs folder not found; pass --runs with the folder holding the runs")
    found = []
    for metrics_path in sorted(runs_dir.rglob(METRICS_FILE)):
        run = metrics_path.parent
        try:
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
            info = json.loads((run / INFO_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(
                f"{run}: unreadable {METRICS_FILE} / {INFO_FILE} ({err}); re-run 'atmask evaluate'"
            ) from None
        tags = {k: str(v) for k, v in info["head"].items()}
        found.append(Run(str(run), tags, info.get("seed"), metrics))
    return found


def runs_from_mlflow(experiment: str, params: Params) -> list[Run]:
    import mlflow

    uri = tracking_uri(params)
    check_reachable(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"MLflow at {uri}: no experiment named {experiment!r}; check --experiment")
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="tags.ablation != ''",
        max_results=5000,
        order_by=["attributes.start_time ASC"],
    )
    found = []
    for run in runs:
        data = run.data
        if mlflow_key("segm/AP") not in data.metrics:
            continue
        tags = {k: v for k, v in data.tags.items() if k == "ablation" or k.startswith("head.")}
        seed = data.tags.get("seed")
        metrics = {key: data.metrics[mlflow_key(key)] for key in COLUMNS if mlflow_key(key) in data.metrics}
        found.append(Run(f"mlflow run {run.info.run_id}", tags, int(seed) if seed else None, metrics))
    return found


def group(runs: list[Run], order: list[str]) -> list[Row]:
    """One row per ablation; a later run of the same (ablation, seed) replaces an earlier one."""
    rows: dict[str, Row] = {}
    for i, run in enumerate(runs):
        row = rows.setdefault(run.tags["ablation"], Row(run.tags["ablation"], run.tags))
        row.runs[run.seed if run.seed is not None else -1 - i] = run
    rank = {name: i for i, name in enumerate(order)}
    return sorted(rows.values(), key=lambda r: (rank.get(r.ablation, len(rank)), r.ablation))


# ------------------------------------------------------------------ rendering


def _flag(value: Any) -> bool:
    return str(value).lower() == "true"


def ticks(head: dict[str, Any]) -> list[str]:
    """Thr, P2T, T2P, Rt source, k, T target, as the paper's tables show them (blank = not used)."""
    if not _flag(head.get("head.threshold_branch")):
        return ["", "", "", "", "", ""]
    mark = [
        "✓" if _flag(head.get(f"head.{k}")) else "" for k in ("threshold_branch", "p2t_fusion", "t2p_fusion")
    ]
    rt = "P2" if head.get("head.rt_source") == "p2" else "P2~P5"
    target = head.get("head.threshold_target", "inverted")
    return [*mark, rt, f"{float(head.get('head.k', 0)):g}", "" if target == "inverted" else target]


def _pct(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def delta_cell(d: Interval | None) -> str:
    if d is None:
        return "–"
    text = f"{100 * d.mean:+.1f}"
    if d.low is not None and d.high is not None:
        text += f" [{100 * d.low:+.1f}, {100 * d.high:+.1f}]" + ("" if d.significant else " n.s.")
    return text


def markdown(rows: list[Row]) -> str:
    base = next((r for r in rows if r.ablation == "baseline"), None)
    header = ["ablation", "Thr", "P2T", "T2P", "Rt", "k", "T target", "seeds", *HEADERS, *DELTAS.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.ablation, *ticks(row.head), str(len(row.runs))]
        cells += [_pct(row.mean(k), row.std(k)) for k in COLUMNS]
        cells += [delta_cell(row.delta(base, key)) for key in DELTAS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[Row]) -> str:
    base = next((r for r in rows if r.ablation == "baseline"), None)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    delta_fields = ("", "_ci_low", "_ci_high", "_pairs", "_significant")
    writer.writerow(
        ["ablation", *HEAD_KEYS, "runs", "seeds", *(f"{k}_{s}" for k in COLUMNS for s in ("mean", "std"))]
        + [f"delta_{k}{suffix}" for k in DELTAS for suffix in delta_fields]
    )
    for row in rows:
        cells: list[Any] = [row.ablation, *(row.head.get(f"head.{k}", "") for k in HEAD_KEYS)]
        cells += [len(row.runs), " ".join(str(s) for s in row.seeds)]
        for key in COLUMNS:
            cells += [_num(row.mean(key)), _num(row.std(key))]
        for key in DELTAS:
            d = row.delta(base, key)
            cells += [_num(d and d.mean), _num(d and d.low), _num(d and d.high), d.n if d else ""]
            cells.append("" if d is None or d.significant is None else str(d.significant).lower())
        writer.writerow(cells)
    return out.getvalue()


def _num(value: float | None) -> str:
    return "" if value is None else repr(float(value))


# ------------------------------------------------------------------ the step


TITLE = (
    "# Ablations (measured; source: {where})\n\n"
    "Mask AP in %: mean ± std over seeds. Δ: paired difference to the baseline on the same seeds, mean "
    "[95% t-interval over seeds]; n.s.: the interval contains 0, so the difference is not significant.\n\n"
)


def report(
    params: Params,
    runs_dir: str | Path | None = "runs",
    experiment: str | None = None,
    out_dir: str | Path = "reports",
    log_mlflow: bool = False,
) -> list[Row]:
    """Build the ablation table from run folders (or an MLflow experiment) and write it to ``out_dir``."""
    if experiment:
        runs, where = runs_from_mlflow(experiment, params), f"MLflow experiment {experiment!r}"
    else:
        runs, where = runs_from_folder(Path(runs_dir)), f"{runs_dir}"
    if not runs:
        raise UserError(f"{where}: no evaluated runs found; run 'atmask evaluate' on the trained runs first")
    rows = group(runs, list(params.ablations))
    stale = [r.ablation for r in rows if r.ablation not in params.ablations]
    if stale and not experiment:  # run folders of ablations no longer in params.yaml
        print(f"atmask report: note: skipping runs of {', '.join(stale)} (not under 'ablations:')")
        rows = [r for r in rows if r.ablation in params.ablations]
    md = markdown(rows)
    out_dir = Path(out_dir)
    write_text_atomic(out_dir / "ablations.csv", csv_text(rows))
    write_text_atomic(out_dir / "ablations.md", TITLE.format(where=where) + md)
    scores = {r.ablation: {k: list(r.values(k).values()) for k in DELTAS} for r in rows}
    report_plots.render_errorbars(scores, out_dir / "plots")
    if not experiment:
        runs_by_ablation = {r.ablation: [Path(run.source) for run in r.runs.values()] for r in rows}
        report_plots.render(runs_by_ablation, out_dir / "plots")
    if log_mlflow:
        log_study(params, rows, out_dir)
    print(md, end="")
    return rows


def study_metrics(rows: list[Row]) -> dict[str, float]:
    """The table as MLflow metrics: ``<ablation>/<metric>_mean`` (and ``_std``, ``delta_...``)."""
    base = next((r for r in rows if r.ablation == "baseline"), None)
    metrics: dict[str, float] = {}
    for row in rows:
        metrics[f"{row.ablation}/seeds"] = float(len(row.runs))
        for key in COLUMNS:
            for stat, value in (("mean", row.mean(key)), ("std", row.std(key))):
                if value is not None:
                    metrics[f"{row.ablation}/{mlflow_key(key)}_{stat}"] = value
        for key in DELTAS:
            d = row.delta(base, key)
            for stat, value in (("", d and d.mean), ("_ci_low", d and d.low), ("_ci_high", d and d.high)):
                if value is not None:
                    metrics[f"{row.ablation}/delta_{mlflow_key(key)}{stat}"] = value
    return metrics


def log_study(params: Params, rows: list[Row], out_dir: Path) -> None:
    """A ``study`` run in the experiment: the table's numbers as metrics, the report files as artifacts."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(params)
    check_reachable(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        experiment = client.get_experiment_by_name(params.mlflow.experiment)
        exp_id = (
            experiment.experiment_id if experiment else client.create_experiment(params.mlflow.experiment)
        )
        run = client.create_run(exp_id, run_name="study", tags={"study": "ablations"})
        stamp = run.info.start_time
        metrics = [mlflow.entities.Metric(k, v, stamp, 0) for k, v in study_metrics(rows).items()]
        for start in range(0, len(metrics), 900):  # the REST API takes at most 1000 per batch
            client.log_batch(run.info.run_id, metrics=metrics[start : start + 900])
        client.log_artifacts(run.info.run_id, str(out_dir), artifact_path="report")
        client.set_terminated(run.info.run_id)
    except MlflowException as err:
        raise UserError(f"MLflow at {uri}: cannot log the study ({err.message.splitlines()[0]})") from None
    print(f"atmask report: logged the study to MLflow run {run.info.run_id} ({uri})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runs", type=Path, default=Path("runs"), help="folder of evaluated runs (default: runs)"
    )
    parser.add_argument("--experiment", help="read the runs from this MLflow experiment instead of --runs")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="output folder (default: reports)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    parser.add_argument(
        "--mlflow",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log the table as a 'study' run in the MLflow experiment (default; --no-mlflow skips it)",
    )


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    report(params, args.runs, args.experiment, args.out, log_mlflow=args.mlflow)
    print(f"wrote {args.out / 'ablations.md'} and {args.out / 'ablations.csv'}")
    return 0
