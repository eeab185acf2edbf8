"""A local double of the Kubernetes API server for the calls the TrainJob launcher makes, over real HTTP:
create / get / delete ``trainjobs.trainer.kubeflow.org`` (namespaced custom objects), list pods by label
selector, and read (follow) a pod's log. Paths, verbs, status codes and ``Status`` error bodies are the API
server's; what a TrainJob does over time is scripted per test (:class:`Script`)."""

from __future__ import annotations

import http.server
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

JOBS = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")


@dataclass
class Script:
    """How the double behaves: the answer to create, and the TrainJob's life once created."""

    create_status: int = 201
    create_message: str = ""
    namespaces: tuple[str, ...] = ("atmask-pipelines",)
    polls_until_done: int = 2  # status reads before the terminal condition appears
    outcome: str = "Complete"  # Complete | Failed | never
    reason: str = ""
    message: str = ""
    log_lines: tuple[str, ...] = ("rank 0: iteration 1", "rank 0: iteration 2")
    on_complete: Callable[[dict[str, Any]], None] | None = None  # e.g. write the run folder as rank 0 would


@dataclass
class KubeApiDouble:
    url: str
    script: Script = field(default_factory=Script)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)  # what exists now, by name
    calls: list[tuple[str, str]] = field(default_factory=list)  # (verb, path?query)
    bodies: list[dict[str, Any]] = field(default_factory=list)  # created objects and delete options
    polls: int = 0

    def api_client(self) -> Any:
        from kubernetes import client

        config = client.Configuration()
        config.host = self.url
        return client.ApiClient(config)

    def verbs(self) -> list[str]:
        return [verb for verb, _ in self.calls]


def _status(code: int, message: str, reason: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
            "code": code}  # fmt: skip


class _Handler(http.server.BaseHTTPRequestHandler):
    double: KubeApiDouble

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length)) if length else {}

    def _record(self, verb: str) -> tuple[str, dict[str, list[str]]]:
        parsed = urlparse(self.path)
        self.double.calls.append((verb, self.path))
        return parsed.path, parse_qs(parsed.query)

    def do_POST(self) -> None:
        path, _ = self._record("create")
        d, s = self.double, self.double.script
        match = JOBS.match(path)
        body = self._body()
        d.bodies.append(body)
        if not match:
            return self._reply(
                404, _status(404, "the server could not find the requested resource", "NotFound")
            )
        if match.group(1) not in s.namespaces:
            return self._reply(404, _status(404, f'namespaces "{match.group(1)}" not found', "NotFound"))
        if s.create_status != 201:
            return self._reply(s.create_status, _status(s.create_status, s.create_message, "Forbidden"))
        name = body["metadata"]["name"]
        if name in d.jobs:
            message = f'trainjobs.trainer.kubeflow.org "{name}" already exists'
            return self._reply(409, _status(409, message, "AlreadyExists"))
        d.jobs[name] = {**body, "status": {}}
        self._reply(201, d.jobs[name])

    def do_GET(self) -> None:
        verb = "log" if LOG.match(urlparse(self.path).path) else "get"
        path, query = self._record(verb)
        if verb == "log":
            return self._log(LOG.match(path).group(2))
        if PODS.match(path):
            return self._pods(query.get("labelSelector", [""])[0])
        match = JOBS.match(path)
        job = self.double.jobs.get(match.group(2)) if match and match.group(2) else None
        if job is None:
            return self._reply(404, _status(404, "trainjobs.trainer.kubeflow.org not found", "NotFound"))
        self._advance(job)
        self._reply(200, job)

    def _advance(self, job: dict[str, Any]) -> None:
        d, s = self.double, self.double.script
        d.polls += 1
        if s.outcome == "never" or d.polls <= s.polls_until_done or job["status"].get("conditions"):
            return
        if s.outcome == "Complete" and s.on_complete:
            s.on_complete(job)
        condition = {"type": s.outcome, "status": "True", "reason": s.reason, "message": s.message}
        job["status"]["conditions"] = [condition]

    def _pods(self, selector: str) -> None:
        labels = dict(item.split("=", 1) for item in selector.split(",") if "=" in item)
        name = labels.get("jobset.sigs.k8s.io/jobset-name", "")
        items = []
        if name in self.double.jobs and labels.get("batch.kubernetes.io/job-completion-index") == "0":
            items.append({
                "metadata": {"name": f"{name}-node-0-0-x7k2p", "namespace": "atmask-pipelines",
                             "creationTimestamp": "2026-01-01T00:00:00Z"},
                "status": {"phase": "Running", "containerStatuses": [
                    {"name": "node", "restartCount": 0, "ready": True, "image": "i", "imageID": "",
                     "containerID": ""}]},
            })  # fmt: skip
        self._reply(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})

    def _log(self, pod: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()  # HTTP/1.0: the body ends when the connection closes, as a followed log does
        for line in self.double.script.log_lines:
            self.wfile.write(f"{line}\n".encode())
            self.wfile.flush()
            time.sleep(0.05)

    def do_DELETE(self) -> None:
        path, _ = self._record("delete")
        self.double.bodies.append(self._body())
        match = JOBS.match(path)
        if not match or self.double.jobs.pop(match.group(2) or "", None) is None:
            return self._reply(404, _status(404, "trainjobs.trainer.kubeflow.org not found", "NotFound"))
        self._reply(200, _status(200, "", "") | {"status": "Success"})


@pytest.fixture
def kube_api() -> Iterator[KubeApiDouble]:
    """A fresh double on 127.0.0.1; set ``kube_api.script`` before the launcher runs."""
    handler = type("Handler", (_Handler,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    double = KubeApiDouble(f"http://127.0.0.1:{server.server_address[1]}")
    handler.double = double
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield double
    server.shutdown()
    server.server_close()
