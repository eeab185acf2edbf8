"""What a pipeline run is handed from this checkout: the DVC data version, the DVC remote, the git source,
and (for ``submit``) the namespace of the kube context.

The data version is the hash dvc.lock records for the dataset folder (``data/coco``), read from the working
tree or from a commit (``--data-rev``); the remote is the one in .dvc/config that ``dvc push`` uses. A pod
never sees the repository: these few strings are all it needs to pull exactly that content (``atmask pull``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from components.errors import UserError
from components.provenance import check_md5, find_repo, git_commit, git_repo, lock_outs, remote_config

PUSH_HINT = "run 'dvc repro ingest && dvc push' and commit dvc.lock"


def _lock_text(repo: Path, rev: str | None) -> str:
    if rev is None:
        lock = repo / "dvc.lock"
        if not lock.is_file():
            raise UserError(f"{lock}: not found; the data version comes from dvc.lock: {PUSH_HINT}")
        return lock.read_text(encoding="utf-8")
    result = subprocess.run(["git", "show", f"{rev}:dvc.lock"], cwd=repo, capture_output=True, text=True)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["git show failed"])[-1]
        raise UserError(
            f"--data-rev {rev}: no dvc.lock at that revision ({reason}); pass a commit that has one"
        )
    return result.stdout


def data_arguments(
    repo: Path, data_path: str, rev: str | None = None, remote: str | None = None, cluster: bool = True
) -> dict[str, str]:
    """``data_md5``, ``data_path`` and ``dvc_remote`` pipeline arguments; ``cluster``: the remote must be
    one a pod can read (S3), not a folder on this machine."""
    where = f"dvc.lock at {rev}" if rev else str(repo / "dvc.lock")
    entry = lock_outs(_lock_text(repo, rev)).get(data_path)
    if not entry or not entry.get("md5"):
        raise UserError(f"{where}: no output {data_path!r}; {PUSH_HINT}")
    md5 = check_md5(str(entry["md5"]), f"{where}: {data_path} md5")
    found = remote_config(repo, remote)
    if found is None:
        raise UserError(
            f"{repo / '.dvc' / 'config'}: no default DVC remote; add one (dvc remote add -d storage "
            "s3://bucket/dvc) and run 'dvc push', or pass --dvc-remote"
        )
    if cluster and not found["url"].startswith("s3://"):
        raise UserError(
            f"DVC remote {found['name']!r} is {found['url']}, which pods cannot read; add an S3 remote "
            "(dvc remote add -d storage s3://bucket/dvc), 'dvc push', and submit again"
        )
    return {
        "data_md5": md5,
        "data_path": data_path,
        "dvc_remote": found["url"],
        "endpoint": found.get("endpointurl", ""),
    }


def source_arguments(repo: Path) -> dict[str, str]:
    """MLflow's source tags for the run: this checkout's commit and repository URL."""
    return {"git_commit": git_commit(repo), "git_repo": git_repo(repo)}


def repo_root(start: Path) -> Path:
    repo = find_repo(start)
    if repo is None:
        raise UserError(
            f"{start.resolve()}: not inside a DVC repository (no .dvc/); run this from the project's clone"
        )
    return repo


def kube_namespace(context: str | None = None) -> str | None:
    """The namespace of the kube config's current (or given) context, as kubectl uses it; None without one."""
    from kubernetes import config

    files = os.environ.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())
    if not any(Path(f).is_file() for f in files.split(os.pathsep)):
        return None
    try:
        contexts, active = config.list_kube_config_contexts(config_file=files)
    except (config.ConfigException, OSError, TypeError, ValueError):
        return None
    chosen: dict[str, Any] | None = active
    if context:
        chosen = next((c for c in contexts or [] if c.get("name") == context), None)
    return ((chosen or {}).get("context") or {}).get("namespace")
