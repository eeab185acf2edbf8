"""``atmask pull``: one DVC data version, by its hash, from the DVC remote into a shared folder.

What the cluster pipeline's data task runs (and ``atmask pipeline run-local``). A pod has neither the git
repository nor DVC's config, only what ``atmask pipeline submit`` read from them: the folder hash dvc.lock
records for ``data/coco`` and the remote's URL. DVC keeps every version content-addressed in its remote
(``<remote>/files/md5/ab/cdef...``; a folder is a ``.dir`` object listing its files' md5 and relative
paths), so this reads the listing and the files straight from there: boto3 for ``s3://`` (credentials and
endpoint from the environment, the ``atmask-s3`` Secret on a cluster), a copy for a local remote. Every
file's md5 and the listing's own hash are checked; the finished folder is renamed into place as
``<root>/<hex>/`` with the record ``<root>/<hex>.json`` beside it (written last), and made read-only.

A version already in place (record present) is reused without a download, so every pipeline run after the
first one of a data version costs a file check, and two runs pulling at once leave one copy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import stat
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from components.errors import UserError
from components.io import write_json_atomic
from components.provenance import CHUNK, DIR_SUFFIX, RECORD_SUFFIX, check_md5, listing_md5, object_uri


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--md5", required=True, help="the folder's DVC hash, <32 hex>.dir (dvc.lock's md5 for data/coco)")
    add("--remote", required=True, help="the DVC remote's URL (s3://bucket/prefix or a local folder)")
    add("--root", type=Path, required=True, help="shared folder that holds pulled versions (<root>/<hex>/)")
    add("--name", default="data/coco", help="the DVC output path (the MLflow dataset name)")
    add("--jobs", type=int, default=16, help="parallel downloads (default 16)")


def run(args: argparse.Namespace) -> int:
    folder = pull(args.md5, args.remote, args.root, args.name, args.jobs)
    print(folder)
    return 0


class Remote:
    """Read access to a DVC remote's objects: ``s3://bucket/prefix`` or a local folder."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.s3 = None
        if self.url.startswith("s3://"):
            from components.s3 import s3_client

            self.s3 = s3_client(None)
        elif "://" in self.url and not self.url.startswith("file://"):
            raise UserError(f"DVC remote {url}: only s3:// and local remotes can be pulled by hash")

    def _split(self, uri: str) -> tuple[str, str]:
        bucket, _, key = uri[len("s3://") :].partition("/")
        return bucket, key

    def open(self, uri: str) -> Any:
        """A binary stream of the object at ``uri``; ``FileNotFoundError`` when it does not exist."""
        if self.s3 is None:
            return open(uri.removeprefix("file://"), "rb")
        from botocore.exceptions import ClientError

        bucket, key = self._split(uri)
        try:
            return self.s3.get_object(Bucket=bucket, Key=key)["Body"]
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(uri) from None
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise UserError(
                    f"DVC remote {self.url}: access denied to {uri} ({code}); check AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL (the atmask-s3 Secret on a cluster)"
                ) from None
            raise UserError(f"DVC remote {self.url}: reading {uri} failed ({code or err})") from None

    def read(self, uri: str) -> bytes:
        stream = self.open(uri)
        try:
            return stream.read()
        finally:
            stream.close()


def _missing(remote: str, md5: str, what: str) -> UserError:
    return UserError(
        f"DVC remote {remote}: data version {md5} is not there ({what} missing); run 'dvc push' in the "
        "repository whose dvc.lock names it, or submit with --data-rev of a pushed commit"
    )


def read_listing(remote: Remote, md5: str) -> list[dict[str, Any]]:
    """The ``.dir`` object's entries, checked against ``md5`` (a listing that does not hash to its name
    is a corrupt remote)."""
    uri = object_uri(remote.url, md5)
    try:
        entries = json.loads(remote.read(uri))
    except FileNotFoundError:
        raise _missing(remote.url, md5, uri) from None
    except ValueError:
        raise UserError(
            f"DVC remote {remote.url}: {uri} is not a DVC listing (not JSON); re-push it"
        ) from None
    if listing_md5(entries) + DIR_SUFFIX != md5:
        raise UserError(
            f"DVC remote {remote.url}: {uri} does not hash to {md5}; the remote is corrupt, re-push"
        )
    return entries


def _fetch(remote: Remote, md5: str, entry: dict[str, Any], dest: Path) -> int:
    """Download one file to ``dest/relpath``, checking its md5 while it streams; returns its size."""
    target = dest / entry["relpath"]
    target.parent.mkdir(parents=True, exist_ok=True)
    uri = object_uri(remote.url, entry["md5"])
    try:
        stream = remote.open(uri)
    except FileNotFoundError:
        raise _missing(remote.url, md5, f"{entry['relpath']} ({uri})") from None
    digest, size = hashlib.md5(usedforsecurity=False), 0
    try:
        with open(target, "wb") as out:
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
    finally:
        stream.close()
    if digest.hexdigest() != entry["md5"]:
        raise UserError(
            f"DVC remote {remote.url}: {uri} ({entry['relpath']}) has md5 {digest.hexdigest()}, the listing "
            "says its name; the remote is corrupt, re-push that file with 'dvc push'"
        )
    return size


def _make_read_only(folder: Path) -> None:
    """Files r--, folders r-x: a pulled version is never edited in place (reading tasks mount it
    read-only too); ``shutil.rmtree`` after ``chmod -R u+w`` removes it."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            os.chmod(Path(dirpath) / name, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        os.chmod(
            dirpath, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
        )


def _writable_root(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{uuid.uuid4().hex}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"{root}: cannot write the dataset folder as uid {os.getuid()} ({err.strerror}); mount the "
            "atmask-datasets PVC read-write in this task and give the pod fsGroup 10001 "
            "(k8s/base/admission.yaml)"
        ) from None


def pull(md5: str, remote_url: str, root: Path, name: str = "data/coco", jobs: int = 16) -> Path:
    """``<root>/<hex>/``, holding exactly the data version ``md5`` of ``remote_url``."""
    check_md5(md5, "--md5")
    hexname = md5.removesuffix(DIR_SUFFIX)
    folder, record = root / hexname, root / (hexname + RECORD_SUFFIX)
    if record.is_file() and folder.is_dir():
        return folder
    remote = Remote(remote_url)
    _writable_root(root)
    entries = read_listing(remote, md5)
    tmp = root / f".{hexname}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.mkdir()
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            size = sum(pool.map(lambda e: _fetch(remote, md5, e, tmp), entries))
        _make_read_only(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():  # anything but "another task pulled it first" is an error
                raise
    finally:
        if tmp.exists():
            os.chmod(tmp, stat.S_IRWXU)
            for dirpath, dirnames, _ in os.walk(tmp):
                for d in dirnames:
                    os.chmod(Path(dirpath) / d, stat.S_IRWXU)
            shutil.rmtree(tmp, ignore_errors=True)
    info = {"md5": md5, "source": object_uri(remote.url, md5), "remote": remote.url, "name": name}
    write_json_atomic(record, {**info, "nfiles": len(entries), "bytes": size})
    print(
        f"atmask pull: {name} {md5}: {len(entries)} files, {size / 1e6:.1f} MB -> {folder}", file=sys.stderr
    )
    return folder
