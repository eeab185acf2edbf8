"""Where a run's data and code come from, recorded the same way by ``dvc repro``, ``run-local`` and the cluster.

Data: the unit of versioning is the DVC-tracked dataset folder. Its version is DVC's content hash of the
folder (what dvc.lock records for ``data/coco``: ``md5: <32 hex>.dir``), and it lives in the DVC remote
content-addressed, at ``<remote>/files/md5/<first 2 hex>/<other 30>.dir`` (DVC 3's layout). A training run
logs that pair as an MLflow dataset input (digest = the hash, source = the ``.dir`` object in the remote),
so the local and the cluster runs of one data version show the same Dataset in the MLflow UI.

:func:`data_version` finds the hash of a folder without trusting anything it cannot check cheaply:

1. a folder pulled by ``atmask pull`` is named by its hash and has a record beside it (``<hash>.json``);
2. a folder inside a DVC repository takes dvc.lock's entry for its path when the entry's file count and
   size match the folder (``dvc repro`` writes the entry right after the stage that made the folder);
3. otherwise the hash is computed exactly as DVC computes it (:func:`dir_md5`).

Code: MLflow's standard source tags (``mlflow.source.git.commit``, ``mlflow.source.name``,
``mlflow.source.type``); a pipeline task has no git checkout, so ``atmask pipeline submit`` hands the commit
and repository to it, and the task sets ``$ATMASK_GIT_COMMIT`` / ``$ATMASK_GIT_REPO`` / ``$ATMASK_SOURCE_TYPE``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from components.errors import UserError

DIR_SUFFIX = ".dir"
MD5_PATTERN = re.compile(r"[0-9a-f]{32}\.dir")
RECORD_SUFFIX = ".json"  # a pulled version: <root>/<hex>/ and its record <root>/<hex>.json
ENV_COMMIT, ENV_REPO, ENV_SOURCE_TYPE = "ATMASK_GIT_COMMIT", "ATMASK_GIT_REPO", "ATMASK_SOURCE_TYPE"
CHUNK = 1 << 20


@dataclass(frozen=True)
class DataVersion:
    """One DVC data version: its hash, where the remote keeps it, and its path in the repository."""

    md5: str  # "<32 hex>.dir", as in dvc.lock
    source: str  # URI of the .dir object in the DVC remote (the folder itself when there is no remote)
    name: str  # the DVC output path, e.g. "data/coco": the MLflow dataset's name on every path

    def to_dict(self) -> dict[str, str]:
        return {"md5": self.md5, "source": self.source, "name": self.name}


def check_md5(value: str, what: str) -> str:
    if not MD5_PATTERN.fullmatch(value or ""):
        raise UserError(
            f"{what} {value!r}: not a DVC folder hash (32 hex digits + '.dir', the md5 dvc.lock records "
            "for data/coco)"
        )
    return value


def object_uri(remote: str, md5: str) -> str:
    """Where DVC 3 keeps the object ``md5`` in ``remote`` (``files/md5/ab/cdef...``)."""
    return f"{remote.rstrip('/')}/files/md5/{md5[:2]}/{md5[2:]}"


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d not in (".dvc", ".git")]
        for name in filenames:
            yield Path(dirpath) / name


def listing_md5(entries: list[dict[str, Any]]) -> str:
    """The hash of a ``.dir`` listing: md5 of its ``md5``/``relpath`` entries as DVC serialises them."""
    core = sorted(({"md5": e["md5"], "relpath": e["relpath"]} for e in entries), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(core, sort_keys=True).encode("utf-8"), usedforsecurity=False).hexdigest()


def dir_md5(folder: Path) -> str:
    """DVC's hash of ``folder``: every file's md5, then the md5 of the sorted listing, plus ``.dir``."""
    entries = [{"md5": file_md5(p), "relpath": p.relative_to(folder).as_posix()} for p in _files(folder)]
    return listing_md5(entries) + DIR_SUFFIX


def _count(folder: Path) -> tuple[int, int]:
    sizes = [p.stat().st_size for p in _files(folder)]
    return len(sizes), sum(sizes)


def find_repo(path: Path) -> Path | None:
    """The DVC repository (the folder holding ``.dvc/``) that contains ``path``, if any."""
    for folder in (path.resolve(), *path.resolve().parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


def remote_config(repo: Path, name: str | None = None) -> dict[str, str] | None:
    """The DVC remote ``name`` (default: ``core.remote``) from .dvc/config and .dvc/config.local:
    ``{"name", "url", "endpointurl"?}``. A relative local URL is resolved against .dvc/, as DVC does."""
    from configobj import ConfigObj

    config: dict[str, Any] = {}
    for file in (repo / ".dvc" / "config", repo / ".dvc" / "config.local"):
        if file.is_file():
            for section, values in ConfigObj(str(file)).items():
                config.setdefault(section, {}).update(values)
    name = name or config.get("core", {}).get("remote")
    if not name:
        return None
    found = dict(config.get(f'remote "{name}"', {}))
    if not found.get("url"):
        raise UserError(
            f"{repo / '.dvc' / 'config'}: DVC remote {name!r} is not defined; see 'dvc remote list'"
        )
    url = found["url"]
    if "://" not in url and not Path(url).is_absolute():
        found["url"] = str((repo / ".dvc" / url).resolve())
    return {**found, "name": name}


def lock_outs(lock_text: str) -> dict[str, dict[str, Any]]:
    """Every output dvc.lock records, by its path (``data/coco`` -> ``{md5, size, nfiles, ...}``)."""
    lock = yaml.safe_load(lock_text) or {}
    outs: dict[str, dict[str, Any]] = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            outs[str(out.get("path"))] = out
    return outs


def _from_record(data_dir: Path) -> DataVersion | None:
    record = data_dir.with_name(data_dir.name + RECORD_SUFFIX)
    if not record.is_file():
        return None
    info = json.loads(record.read_text(encoding="utf-8"))
    if info.get("md5") != data_dir.name + DIR_SUFFIX:
        return None
    return DataVersion(info["md5"], info["source"], info["name"])


def _from_repo(data_dir: Path) -> DataVersion | None:
    repo = find_repo(data_dir)
    if repo is None:
        return None
    name = data_dir.resolve().relative_to(repo).as_posix()
    lock = repo / "dvc.lock"
    entry = lock_outs(lock.read_text(encoding="utf-8")).get(name) if lock.is_file() else None
    md5 = entry.get("md5") if entry else None
    if not (md5 and _count(data_dir) == (entry.get("nfiles"), entry.get("size"))):
        md5 = dir_md5(data_dir)  # no entry, or the folder changed since dvc.lock was written
    remote = remote_config(repo)
    return DataVersion(md5, object_uri(remote["url"], md5) if remote else str(data_dir.resolve()), name)


def data_version(data_dir: Path) -> DataVersion:
    """The DVC version of the dataset folder ``data_dir`` (see the module docstring for the order)."""
    found = _from_record(data_dir) or _from_repo(data_dir)
    if found is not None:
        return found
    return DataVersion(dir_md5(data_dir), str(data_dir.resolve()), data_dir.name)


def _git(*args: str, cwd: Path | None = None) -> str:
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def git_commit(cwd: Path | None = None) -> str:
    """``$ATMASK_GIT_COMMIT``, else the checked-out commit (``+dirty`` when tracked files changed), else
    ``unknown`` (a container without the repository)."""
    if os.environ.get(ENV_COMMIT):
        return os.environ[ENV_COMMIT]
    head = _git("rev-parse", "HEAD", cwd=cwd)
    if not head:
        return "unknown"
    return f"{head}+dirty" if _git("status", "--porcelain", "--untracked-files=no", cwd=cwd) else head


def git_repo(cwd: Path | None = None) -> str:
    """``$ATMASK_GIT_REPO``, else the ``origin`` remote's URL (credentials stripped), else ``""``."""
    url = os.environ.get(ENV_REPO) or _git("remote", "get-url", "origin", cwd=cwd)
    return re.sub(r"//[^/@]+@", "//", url)


def source_tags(entry_point: str) -> dict[str, str]:
    """MLflow's standard source tags: the UI's Source column and the commit link."""
    repo = git_repo()
    tags = {
        "mlflow.source.git.commit": git_commit(),
        "mlflow.source.name": repo or entry_point,
        "mlflow.source.type": os.environ.get(ENV_SOURCE_TYPE) or "LOCAL",
    }
    if repo:
        tags["mlflow.source.git.repoURL"] = repo
    return tags
