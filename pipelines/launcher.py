"""Run one TrainJob from inside the pipeline's train task: create it, follow it, delete it.

The task creates the TrainJob (:mod:`pipelines.trainjob`), polls its status, streams the rank-0 pod's log
into its own log, and deletes the TrainJob however the task ends: finished, failed, timed out, or
cancelled (Kubeflow Pipelines stops a task with SIGTERM). Whatever goes wrong becomes one line naming the
object and what to do (``UserError``), which is then the task's failure message; nothing is left running.

It speaks the Kubernetes REST API through the official client (in a pod: the ServiceAccount's token; the
Role in k8s/base/rbac.yaml grants exactly create/get/delete on trainjobs and get/list on pods and their log).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from components.errors import UserError
from pipelines.trainjob import API_GROUP, API_VERSION, NODE, PLURAL

RBAC_HINT = (
    "apply the infrastructure (kubectl apply -k k8s/overlays/<env>: Role atmask-pipeline-runner) and submit "
    "with --service-account atmask-pipeline-runner"
)


class Cancelled(Exception):
    """SIGTERM: the pipeline run was cancelled or the pod is being stopped."""


def api_client() -> Any:
    """In a pod: its ServiceAccount; elsewhere: the kube config's current context."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`Cancelled` in the main thread, so ``finally`` blocks run."""

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
        raise Cancelled()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Launcher:
    """Create, follow and delete one TrainJob in ``namespace``."""

    def __init__(
        self,
        api: Any,
        namespace: str,
        service_account: str = "",
        poll_s: float = 10.0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.service_account = service_account or "this task's ServiceAccount"
        self.poll_s = poll_s
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._stop_logs = threading.Event()

    def what(self, name: str) -> str:
        return f"TrainJob {self.namespace}/{name}"

    def run(self, manifest: dict[str, Any], timeout_s: float) -> None:
        """Create the TrainJob and return when it completed; raise ``UserError`` otherwise. Always deletes it."""
        name = manifest["metadata"]["name"]
        with sigterm_raises():
            attempted = False
            try:
                attempted = True
                self.create(manifest)
                self.log(f"atmask pipeline: {self.what(name)} created; following its rank-0 log")
                self.wait(name, timeout_s)
            except Cancelled:
                raise UserError(
                    f"{self.what(name)}: the task was cancelled (SIGTERM); deleted the TrainJob"
                ) from None
            except UserError:
                attempted = attempted and self._exists(name)
                raise
            finally:
                self._stop_logs.set()
                if attempted:
                    self.delete(name)

    # -------------------------------------------------------------- API calls

    def _api_error(self, err: Any, doing: str, name: str) -> UserError:
        message = _message(err)
        if err.status in (401, 403):
            return UserError(
                f"{self.what(name)}: {self.service_account} may not {doing} (HTTP {err.status}: {message}); "
                f"{RBAC_HINT}"
            )
        if err.status == 404 and "namespace" in message.lower():
            return UserError(
                f"{self.what(name)}: namespace {self.namespace} does not exist ({message}); run the pipeline "
                "in a namespace that Kubeflow Pipelines manages (a Profile's namespace)"
            )
        if err.status == 404:
            return UserError(
                f"{self.what(name)}: the API {API_GROUP}/{API_VERSION} trainjobs is not served ({message}); "
                "install Kubeflow Trainer v2 (README 'Run on a cluster')"
            )
        return UserError(f"{self.what(name)}: {doing} failed (HTTP {err.status}: {message})")

    def create(self, manifest: dict[str, Any]) -> None:
        """Create; a TrainJob of the same name (left by a killed attempt of this task) is replaced."""
        from kubernetes.client.exceptions import ApiException

        name = manifest["metadata"]["name"]
        args = (API_GROUP, API_VERSION, self.namespace, PLURAL)
        try:
            self.custom.create_namespaced_custom_object(*args, manifest)
        except ApiException as err:
            if err.status != 409:
                raise self._api_error(err, "create trainjobs", name) from None
            self.log(f"atmask pipeline: {self.what(name)} exists (an earlier attempt); replacing it")
            self.delete(name, wait=True)
            try:
                self.custom.create_namespaced_custom_object(*args, manifest)
            except ApiException as again:
                raise self._api_error(again, "create trainjobs", name) from None

    def _exists(self, name: str) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, self.namespace, PLURAL, name)
        except ApiException:
            return False
        return True

    def status(self, name: str) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            job = self.custom.get_namespaced_custom_object(
                API_GROUP, API_VERSION, self.namespace, PLURAL, name
            )
        except ApiException as err:
            if err.status == 404:
                raise UserError(
                    f"{self.what(name)}: deleted while the task waited for it; re-run the task"
                ) from None
            raise self._api_error(err, "get trainjobs", name) from None
        return job.get("status") or {}

    def delete(self, name: str, wait: bool = False) -> None:
        """Delete with its JobSet and pods (foreground); a TrainJob already gone is fine."""
        from kubernetes.client import V1DeleteOptions
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.delete_namespaced_custom_object(
                API_GROUP, API_VERSION, self.namespace, PLURAL, name,
                body=V1DeleteOptions(propagation_policy="Foreground"),
            )  # fmt: skip
        except ApiException as err:
            if err.status != 404:
                self.log(f"atmask pipeline: warning: could not delete {self.what(name)} (HTTP {err.status}); "
                         f"delete it with: kubectl -n {self.namespace} delete trainjob {name}")  # fmt: skip
            return
        self.log(f"atmask pipeline: {self.what(name)} deleted")
        deadline = time.monotonic() + 120
        while wait and time.monotonic() < deadline:
            try:
                self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, self.namespace, PLURAL, name)
            except ApiException:
                return
            time.sleep(self.poll_s)

    # -------------------------------------------------------------- following

    def wait(self, name: str, timeout_s: float) -> None:
        """Poll until Complete (return) or Failed / past ``timeout_s`` (``UserError``)."""
        threading.Thread(target=self.follow_logs, args=(name,), daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while True:
            conditions = {c.get("type"): c for c in self.status(name).get("conditions") or []}
            if conditions.get("Complete", {}).get("status") == "True":
                self.log(f"atmask pipeline: {self.what(name)} completed")
                return
            failed = conditions.get("Failed", {})
            if failed.get("status") == "True":
                why = f"{failed.get('reason', 'Failed')}: {failed.get('message', '')}".strip(": ")
                raise UserError(
                    f"{self.what(name)} failed ({why}); its rank-0 log is above; deleted the TrainJob"
                )
            if time.monotonic() >= deadline:
                raise UserError(
                    f"{self.what(name)}: not finished after {timeout_s:.0f} s; deleted the TrainJob. Raise the "
                    "pipeline parameter train_timeout_s, or check GPU capacity (kubectl get pods -l "
                    f"jobset.sigs.k8s.io/jobset-name={name})"
                )
            time.sleep(self.poll_s)

    def rank0_pod(self, name: str) -> dict[str, Any] | None:
        selector = f"jobset.sigs.k8s.io/jobset-name={name},batch.kubernetes.io/job-completion-index=0"
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        started = [p for p in pods if p.status and p.status.phase in ("Running", "Succeeded", "Failed")]
        if not started:
            return None
        pod = max(started, key=lambda p: p.metadata.creation_timestamp or 0)
        restarts = sum(s.restart_count for s in (pod.status.container_statuses or []))
        return {"name": pod.metadata.name, "restarts": restarts}

    def follow_logs(self, name: str) -> None:
        """Stream the rank-0 container's log; a new pod or a restarted container is followed again."""
        from kubernetes.client.exceptions import ApiException

        seen: set[tuple[str, int]] = set()
        while not self._stop_logs.is_set():
            try:
                pod = self.rank0_pod(name)
                if pod is None or (pod["name"], pod["restarts"]) in seen:
                    self._stop_logs.wait(self.poll_s)
                    continue
                seen.add((pod["name"], pod["restarts"]))
                self._stream(pod["name"])
            except ApiException as err:
                self.log(
                    f"atmask pipeline: note: rank-0 log unavailable (HTTP {err.status}); training goes on"
                )
                self._stop_logs.wait(self.poll_s)

    def _stream(self, pod: str) -> None:
        response = self.core.read_namespaced_pod_log(
            pod, self.namespace, container=NODE, follow=True, _preload_content=False
        )
        try:
            buffer = b""
            for chunk in response.stream(4096):
                if self._stop_logs.is_set():
                    return
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self.log(f"[{pod}] {line.decode('utf-8', 'replace')}")
            if buffer:
                self.log(f"[{pod}] {buffer.decode('utf-8', 'replace')}")
        finally:
            response.release_conn()


def _message(err: Any) -> str:
    import json

    try:
        return str(json.loads(err.body).get("message") or err.reason)
    except (TypeError, ValueError, AttributeError):
        return str(getattr(err, "reason", "") or err)
