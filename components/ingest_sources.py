"""Where a COCO dataset comes from: a local folder, S3 (or MinIO), HTTP(S) archives, COCO 2017, synthetic.

Every source gives a cheap ``fingerprint()`` (computed without downloading or decoding anything, so an
unchanged source can be recognised before any work) and ``materialise(staging)``, which returns a local
folder in one of the layouts :func:`locate_split` understands.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import zipfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from tqdm import tqdm

from components.errors import UserError
from components.s3 import s3_client
from components.synthetic import GENERATOR_VERSION, SyntheticConfig, generate

ANNOTATION_NAMES = ("instances_{s}.json", "instances_{s}2017.json")
IMAGE_DIRS = ("images/{s}", "{s}", "{s}2017", "images/{s}2017", "images")

COCO2017_BASE_URL = "http://images.cocodataset.org"
# (relative URL, md5) of the official archives
COCO2017_ARCHIVES: dict[str, tuple[str, str]] = {
    "annotations": ("annotations/annotations_trainval2017.zip", "f4bbac642086de4f52a3fdda2de5fa2c"),
    "train": ("zips/train2017.zip", "cced6f7f71b7629ddf16f17bbcfab6b2"),
    "val": ("zips/val2017.zip", "442b8da7639aecaf257c1dceb8ba8c80"),
}


class Source(Protocol):
    description: str
    link_ok: bool  # materialised files are ours (staging): output may hard-link them

    def fingerprint(self) -> Any: ...

    def materialise(self, staging: Path) -> Path: ...


# ---------------------------------------------------------------- local layout


def locate_split(root: Path, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of ``split`` under ``root``."""
    for pattern in ANNOTATION_NAMES:
        ann = root / "annotations" / pattern.format(s=split)
        if ann.is_file():
            break
    else:
        raise UserError(
            f"{root}: no annotation file for split {split!r}; expected annotations/instances_{split}.json "
            f"or annotations/instances_{split}2017.json"
        )
    for pattern in IMAGE_DIRS:
        images = root / pattern.format(s=split)
        if images.is_dir():
            return ann, images
    raise UserError(
        f"{root}: no image folder for split {split!r}; expected one of "
        + ", ".join(p.format(s=split) + "/" for p in IMAGE_DIRS)
    )


def _tree_signature(folder: Path) -> list[tuple[str, int, int]]:
    out: list[tuple[str, int, int]] = []
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir():
                    stack.append(Path(entry.path))
                else:
                    st = entry.stat()
                    out.append((os.path.relpath(entry.path, folder), st.st_size, st.st_mtime_ns))
    return sorted(out)


@dataclass
class LocalSource:
    root: Path
    splits: tuple[str, ...]
    description: str = ""
    link_ok: bool = False

    def __post_init__(self) -> None:
        self.description = self.description or str(self.root)
        if not self.root.is_dir():
            raise UserError(
                f"--source {self.root}: no such folder; give a dataset folder, s3://, https:// or synthetic"
            )

    def fingerprint(self) -> Any:
        parts = []
        for split in self.splits:
            ann, images = locate_split(self.root, split)
            st = ann.stat()
            sig = hashlib.sha256(repr(_tree_signature(images)).encode()).hexdigest()
            parts.append([split, str(ann.relative_to(self.root)), st.st_size, st.st_mtime_ns, sig])
        return {"kind": "local", "root": str(self.root.resolve()), "splits": parts}

    def materialise(self, staging: Path) -> Path:
        return self.root


# ---------------------------------------------------------------- synthetic


@dataclass
class SyntheticSource:
    config: SyntheticConfig
    splits: tuple[str, ...]
    description: str = "synthetic"
    link_ok: bool = True

    def fingerprint(self) -> Any:
        return {"kind": "synthetic", "generator": GENERATOR_VERSION, "config": self.config.to_dict()}

    def materialise(self, staging: Path) -> Path:
        return generate(self.config, staging / "synthetic", self.splits)


# ---------------------------------------------------------------- S3


@dataclass
class S3Source:
    url: str
    splits: tuple[str, ...]
    endpoint_url: str | None = None
    workers: int = 8
    link_ok: bool = True

    def __post_init__(self) -> None:
        parsed = urlparse(self.url)
        if not parsed.netloc:
            raise UserError(f"--source {self.url}: expected s3://bucket/prefix")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.description = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._client = s3_client(self.endpoint_url)
        self._objects: dict[str, tuple[int, str]] | None = None

    def _fail(self, err: Exception) -> UserError:
        where = f" at endpoint {self.endpoint_url}" if self.endpoint_url else ""
        return UserError(
            f"--source {self.url}: S3 request failed{where}: {err}; check the bucket name, the credentials "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and --s3-endpoint-url"
        )

    def objects(self) -> dict[str, tuple[int, str]]:
        """Relative key -> (size, etag) of every object under the prefix."""
        if self._objects is None:
            from botocore.exceptions import BotoCoreError, ClientError

            base = f"{self.prefix}/" if self.prefix else ""
            found: dict[str, tuple[int, str]] = {}
            try:
                pages = self._client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=base
                )
                for page in pages:
                    for obj in page.get("Contents", []):
                        found[obj["Key"][len(base) :]] = (obj["Size"], obj.get("ETag", "").strip('"'))
            except (BotoCoreError, ClientError) as err:
                raise self._fail(err) from None
            if not found:
                raise UserError(
                    f"--source {self.url}: no objects under this prefix; check the bucket and prefix"
                )
            self._objects = found
        return self._objects

    def _needed(self) -> list[str]:
        objects = self.objects()
        keys: list[str] = []
        for split in self.splits:
            anns = [
                p.format(s=split) for p in ANNOTATION_NAMES if f"annotations/{p.format(s=split)}" in objects
            ]
            if not anns:
                raise UserError(
                    f"--source {self.url}: no annotations/instances_{split}.json (or ...{split}2017.json) "
                    "under this prefix; check the prefix and --splits"
                )
            keys.append(f"annotations/{anns[0]}")
            for pattern in IMAGE_DIRS:
                folder = pattern.format(s=split) + "/"
                image_keys = [k for k in objects if k.startswith(folder) and not k.endswith("/")]
                if image_keys:
                    keys.extend(image_keys)
                    break
        return sorted(set(keys))

    def fingerprint(self) -> Any:
        keys = self._needed()
        objects = self.objects()
        sig = hashlib.sha256(repr([(k, *objects[k]) for k in keys]).encode()).hexdigest()
        return {"kind": "s3", "url": self.description, "objects": len(keys), "listing_sha256": sig}

    def materialise(self, staging: Path) -> Path:
        from botocore.exceptions import BotoCoreError, ClientError

        root = staging / "s3"
        keys = self._needed()
        base = f"{self.prefix}/" if self.prefix else ""

        def fetch(key: str) -> None:
            dest = root / key
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._client.download_file(self.bucket, base + key, str(dest))

        try:
            with ThreadPoolExecutor(max(1, self.workers)) as pool:
                list(
                    tqdm(
                        pool.map(fetch, keys),
                        total=len(keys),
                        desc=f"download {self.description}",
                        unit="file",
                        disable=None,  # no bar when stderr is not a terminal (logs, CI)
                    )
                )
        except (BotoCoreError, ClientError) as err:
            raise self._fail(err) from None
        return root


# ---------------------------------------------------------------- HTTP(S) archives


@dataclass(frozen=True)
class Archive:
    url: str
    checksum: str | None = None  # "md5:<hex>" or "sha256:<hex>"


def parse_checksum(value: str, where: str) -> str:
    algo, _, digest = value.partition(":")
    if (
        algo not in ("md5", "sha256")
        or not digest
        or any(c not in "0123456789abcdef" for c in digest.lower())
    ):
        raise UserError(f"{where}: checksum {value!r} must look like sha256:<hex> or md5:<hex>")
    return f"{algo}:{digest.lower()}"


def parse_http_source(source: str, checksum: str | None) -> list[Archive]:
    """Comma-separated URLs; a checksum can follow each as ``#sha256=<hex>`` or come from --checksum."""
    archives = []
    urls = [u for u in source.split(",") if u]
    for url in urls:
        url, _, frag = url.partition("#")
        value = None
        if frag:
            value = parse_checksum(frag.replace("=", ":", 1), f"--source {url}")
        elif checksum:
            if len(urls) > 1:
                raise UserError("--checksum applies to a single URL; give several as URL#sha256=<hex>")
            value = parse_checksum(checksum, "--checksum")
        archives.append(Archive(url, value))
    return archives


def _file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(archive: Archive, cache_dir: Path, *, chunk: int = 1 << 20) -> Path:
    """Download with resume (HTTP Range) into ``cache_dir`` and verify the checksum."""
    import requests

    name = os.path.basename(urlparse(archive.url).path) or "download"
    final = cache_dir / f"{hashlib.sha256(archive.url.encode()).hexdigest()[:12]}-{name}"
    if final.exists() and _checksum_ok(final, archive):
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with requests.get(archive.url, headers=headers, stream=True, timeout=60) as resp:
            if resp.status_code == 416:  # the partial file is already complete
                pass
            else:
                resp.raise_for_status()
                append = have and resp.status_code == 206
                total = int(resp.headers.get("Content-Length", 0)) + (have if append else 0)
                with (
                    open(part, "ab" if append else "wb") as fh,
                    tqdm(
                        total=total or None,
                        initial=have if append else 0,
                        unit="B",
                        unit_scale=True,
                        desc=name,
                        disable=None,
                    ) as bar,
                ):
                    for block in resp.iter_content(chunk):
                        fh.write(block)
                        bar.update(len(block))
    except requests.RequestException as err:
        raise UserError(
            f"--source {archive.url}: download failed: {err}; check the URL and the network, "
            "then run again (the download resumes)"
        ) from None
    if not _checksum_ok(part, archive):
        algo, expected = archive.checksum.split(":")  # type: ignore[union-attr]
        actual = _file_digest(part, algo)
        part.unlink()
        raise UserError(
            f"--source {archive.url}: {algo} checksum mismatch: expected {expected}, got {actual}; "
            "the download was deleted, check the URL/checksum and run again"
        )
    os.replace(part, final)
    return final


def _checksum_ok(path: Path, archive: Archive) -> bool:
    if archive.checksum is None:
        return True
    algo, expected = archive.checksum.split(":")
    return _file_digest(path, algo) == expected


def extract(path: Path, dest: Path, url: str) -> None:
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                zf.extractall(dest)
        elif tarfile.is_tarfile(path):
            with tarfile.open(path) as tf:
                tf.extractall(dest, filter="data")
        else:
            raise UserError(f"--source {url}: not a zip or tar archive; give an archive of a COCO dataset")
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as err:
        raise UserError(f"--source {url}: cannot extract the archive: {err}") from None


def find_dataset_root(folder: Path) -> Path:
    """The folder holding ``annotations/``: ``folder`` itself or its single top-level subfolder."""
    if (folder / "annotations").is_dir():
        return folder
    subs = [p for p in folder.iterdir() if p.is_dir() and (p / "annotations").is_dir()]
    return subs[0] if len(subs) == 1 else folder


@dataclass
class HttpSource:
    archives: list[Archive]
    cache_dir: Path
    description: str = ""
    link_ok: bool = True

    def __post_init__(self) -> None:
        self.description = self.description or ",".join(a.url for a in self.archives)

    def fingerprint(self) -> Any:
        return {
            "kind": "http",
            "archives": [[a.url, a.checksum or self._remote_version(a.url)] for a in self.archives],
        }

    @staticmethod
    def _remote_version(url: str) -> str:
        import requests

        try:
            resp = requests.head(url, allow_redirects=True, timeout=30)
            resp.raise_for_status()
        except requests.RequestException as err:
            raise UserError(f"--source {url}: cannot reach the URL: {err}") from None
        h = resp.headers
        return f"{h.get('ETag', '')}|{h.get('Last-Modified', '')}|{h.get('Content-Length', '')}"

    def materialise(self, staging: Path) -> Path:
        root = staging / "http"
        root.mkdir(parents=True, exist_ok=True)
        for archive in self.archives:
            extract(download(archive, self.cache_dir), root, archive.url)
        return find_dataset_root(root)


def coco2017_source(splits: Iterable[str], cache_dir: Path, base_url: str | None = None) -> HttpSource:
    base = (base_url or os.environ.get("ATMASK_COCO_BASE_URL") or COCO2017_BASE_URL).rstrip("/")
    wanted = ["annotations", *(s for s in splits if s in COCO2017_ARCHIVES)]
    unknown = [s for s in splits if s not in COCO2017_ARCHIVES]
    if unknown:
        raise UserError(f"--splits: COCO 2017 has splits train and val with instance masks, not {unknown}")
    archives = [
        Archive(f"{base}/{COCO2017_ARCHIVES[k][0]}", f"md5:{COCO2017_ARCHIVES[k][1]}") for k in wanted
    ]
    return HttpSource(archives, cache_dir, description="coco2017")
