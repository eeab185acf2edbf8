"""MLflow for ``atmask train``: where the server is, whether it answers, and logging that survives outages.

* ``tracking_uri``: ``$MLFLOW_TRACKING_URI``, else params ``mlflow.tracking_uri``, else ``sqlite:///mlflow.db``.
* ``check_reachable``: one clear ``UserError`` before any training when the server does not answer.
* ``RunTracker``: one MLflow run per training run folder (``runs/<name>/mlflow_run.json``); a resumed
  training continues the same MLflow run. Every call goes through ``retry`` (exponential back-off); what
  still fails is kept and sent with the next call, so a brief outage mid-run loses nothing and never
  stops training.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import requests

from components.errors import UserError
from components.io import write_json_atomic
from components.params import Params
from components.provenance import DataVersion
from components.run_layout import MLFLOW_RUN_FILE

DEFAULT_URI = "sqlite:///mlflow.db"
# MLflow's own HTTP retries back off for minutes by default; ours are shorter and never raise mid-run.
_FAST_FAIL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_MAX_PENDING_METRICS = 100_000
T = TypeVar("T")


def tracking_uri(params: Params | None) -> str:
    """``$MLFLOW_TRACKING_URI``, else params ``mlflow.tracking_uri``, else ``sqlite:///mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (params and params.mlflow.tracking_uri) or DEFAULT_URI


def check_reachable(uri: str, what: str = "MLflow tracking server", timeout: float = 5.0) -> None:
    """Raise ``UserError`` unless an http(s) server answers ``/health`` or a SQLite/file store can be written."""
    if uri.startswith(("http://", "https://")):
        try:
            response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
        except requests.RequestException as err:
            raise UserError(
                f"{what} at {uri} is unreachable ({type(err).__name__}); start it, or set "
                "MLFLOW_TRACKING_URI / params.yaml mlflow.tracking_uri to a reachable server"
            ) from None
        if response.status_code >= 500:
            raise UserError(
                f"{what} at {uri} answered /health with HTTP {response.status_code}; check the server's logs"
            )
        return
    folder = _local_store_folder(uri)
    if folder is not None and not os.access(_existing_parent(folder), os.W_OK):
        raise UserError(f"MLflow store {uri}: {folder} is not writable; set MLFLOW_TRACKING_URI elsewhere")


def _local_store_folder(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).parent
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    if "://" not in uri:
        return Path(uri)
    return None


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


@contextlib.contextmanager
def _fast_fail() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in _FAST_FAIL_ENV}
    for key, value in _FAST_FAIL_ENV.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def retry(
    fn: Callable[[], T], *, what: str, attempts: int = 4, base_delay: float = 0.5, sleep=time.sleep
) -> tuple[bool, T | None]:
    """Call ``fn`` up to ``attempts`` times, waiting ``base_delay * 2**k`` between; ``(ok, result)``.

    Never raises: the caller decides what a final failure means (mid-run: keep going).
    """
    for attempt in range(attempts):
        try:
            with _fast_fail():
                return True, fn()
        except Exception as err:
            if attempt == attempts - 1:
                print(
                    f"atmask train: warning: MLflow {what} failed after {attempts} attempts "
                    f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}); "
                    "will retry with the next call, training goes on",
                    file=sys.stderr,
                )
                return False, None
            sleep(base_delay * 2**attempt)
    return False, None


def mlflow_key(key: str) -> str:
    """metrics.json key -> MLflow metric name: '/' becomes '_' (``segm/AP`` -> ``segm_AP``)."""
    return key.replace("/", "_")


def read_mlflow_run(run_dir: Path) -> dict[str, Any] | None:
    """The ``mlflow_run.json`` record training left in ``run_dir`` (None when there is none)."""
    import json

    path = run_dir / MLFLOW_RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err}); re-run 'atmask train' to rewrite it") from None
    if not isinstance(record, dict) or not record.get("run_id"):
        raise UserError(f"{path}: has no 'run_id'; re-run 'atmask train' to rewrite it")
    return record


def flat_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings -> ``a.b.c`` keys with string values (MLflow params are strings)."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


class RunTracker:
    """One MLflow run, created or resumed; all logging retried, failures buffered, never raised."""

    def __init__(self, uri: str, run_id: str, experiment_id: str) -> None:
        import mlflow

        self.uri = uri
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self._pending: list[Any] = []
        self.failures = 0

    @classmethod
    def start(cls, uri: str, experiment: str, run_dir: Path, run_name: str, *, resume: bool) -> RunTracker:
        """Create (or, when resuming, reopen) the run and write ``run_dir/mlflow_run.json``."""
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            with _fast_fail(), sqlite_store_lock(uri):
                client = mlflow.MlflowClient(tracking_uri=uri)
                run_id, experiment_id = _reopen(client, run_dir, uri) if resume else (None, None)
                if run_id is None:
                    experiment_id = _experiment_id(client, experiment)
                    run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
                else:
                    client.update_run(run_id, status="RUNNING")
        except (MlflowException, requests.RequestException, OSError) as err:
            raise UserError(
                f"MLflow at {uri}: cannot create the training run in experiment {experiment!r} "
                f"({str(err).splitlines()[0][:300]}); check the server and mlflow.experiment in params.yaml"
            ) from None
        write_json_atomic(
            run_dir / MLFLOW_RUN_FILE, {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri}
        )
        return cls(uri, run_id, experiment_id)

    def log_params(self, values: Mapping[str, Any]) -> None:
        """Log params not logged yet (a resumed run keeps its params; MLflow forbids changing them)."""
        from mlflow.entities import Param

        ok, run = retry(lambda: self.client.get_run(self.run_id), what="get_run")
        existing = run.data.params if ok and run is not None else {}
        fresh = [Param(k, v) for k, v in flat_params(values).items() if k not in existing]
        for lo in range(0, len(fresh), 100):  # MLflow's per-request limit
            chunk = fresh[lo : lo + 100]
            self._call(lambda c=chunk: self.client.log_batch(self.run_id, params=c), "log params")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self._call(lambda: self.client.log_batch(self.run_id, tags=batch), "set tags")

    def log_metrics(self, values: Mapping[str, float], step: int) -> None:
        """Queue step metrics and send everything queued; on an outage they wait for the next call."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(mlflow_key(k), float(v), now, step) for k, v in values.items()]
        del self._pending[:-_MAX_PENDING_METRICS]
        self.flush(attempts=2)

    def flush(self, attempts: int = 4) -> bool:
        while self._pending:
            chunk = self._pending[:1000]  # MLflow's per-request limit
            ok, _ = retry(
                lambda c=chunk: self.client.log_batch(self.run_id, metrics=c),
                what="log metrics",
                attempts=attempts,
            )
            if not ok:
                self.failures += 1
                return False
            del self._pending[: len(chunk)]
        return True

    def log_dataset(self, version: DataVersion, context: str) -> None:
        """The run's data as an MLflow dataset input: digest = the DVC hash, source = the remote object."""
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MLflow warns about its source-type probing
            dataset = MetaDataset(
                resolve_dataset_source(version.source), name=version.name, digest=version.md5
            )
        entry = DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])
        self._call(lambda: self.client.log_inputs(self.run_id, datasets=[entry]), "log dataset")

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._call(
            lambda: self.client.log_artifact(self.run_id, str(path), artifact_path), f"upload {path.name}"
        )

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self._call(lambda: self.client.set_terminated(self.run_id, status=status), "end run")

    def _call(self, fn: Callable[[], Any], what: str) -> None:
        ok, _ = retry(fn, what=what)
        if not ok:
            self.failures += 1


@contextlib.contextmanager
def sqlite_store_lock(uri: str) -> Iterator[None]:
    """Serialise first use of a SQLite store across processes (no-op for other stores).

    MLflow creates the schema of a new SQLite file on first use; two processes doing that at once (the
    parallel training tasks of ``atmask pipeline run-local``) fail with "table ... already exists".
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri[len("sqlite:///") :])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(f".{db.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _experiment_id(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = client.get_experiment_by_name(name)  # another process created it just now
    if found.lifecycle_stage == "deleted":
        client.restore_experiment(found.experiment_id)
    return found.experiment_id


def _reopen(client: Any, run_dir: Path, uri: str) -> tuple[str | None, str | None]:
    """The run recorded in ``run_dir/mlflow_run.json`` if it lives on this server, else ``(None, None)``."""
    import json

    from mlflow.exceptions import MlflowException

    path = run_dir / MLFLOW_RUN_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("tracking_uri") != uri:
            return None, None
        run = client.get_run(record["run_id"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, None
    except MlflowException:  # deleted or from a wiped store: start a new run
        return None, None
    return run.info.run_id, run.info.experiment_id
