"""``atmask ingest`` end to end: synthetic, local folder (Penn-Fudan) and S3 (moto) sources give the same
normalised layout for the same data; re-ingest is a no-op; ``--help`` documents every option."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from components import cli
from components.ingest import add_arguments, ingest
from components.synthetic import SyntheticConfig, generate

TINY = SyntheticConfig(seed=3, train_images=3, val_images=2, image_size=64, num_categories=3, max_instances=3)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def upload(folder: Path, endpoint: str, bucket: str, prefix: str) -> int:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    for path in files:
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder)}")
    return len(files)


def assert_same_dataset(a: Path, b: Path, splits: tuple[str, ...]) -> None:
    """Same annotation bytes, images and manifest counts/categories (sources and fingerprints differ)."""
    for split in splits:
        name = f"annotations/instances_{split}.json"
        assert (a / name).read_bytes() == (b / name).read_bytes()
    images_a = {k: v for k, v in tree_digest(a).items() if k.startswith("images/")}
    assert images_a and images_a == {k: v for k, v in tree_digest(b).items() if k.startswith("images/")}
    ma, mb = manifest(a), manifest(b)
    assert ma["splits"] == mb["splits"]
    assert ma["categories"] == mb["categories"]
    assert ma["problems"] == mb["problems"] == {}


def test_synthetic_local_and_s3_sources_give_the_same_layout(tmp_path, s3_server, s3_bucket):
    raw = generate(TINY, tmp_path / "raw")
    synthetic = ingest("synthetic", tmp_path / "from-synthetic", synthetic=TINY, workers=2)
    local = ingest(str(raw), tmp_path / "from-local", workers=2)
    assert upload(raw, s3_server, s3_bucket, "coco/tiny") == 2 + 3 + 2
    s3 = ingest(f"s3://{s3_bucket}/coco/tiny", tmp_path / "from-s3", s3_endpoint_url=s3_server, workers=2)

    assert not (synthetic.skipped or local.skipped or s3.skipped)
    assert_same_dataset(tmp_path / "from-synthetic", tmp_path / "from-local", ("train", "val"))
    assert_same_dataset(tmp_path / "from-synthetic", tmp_path / "from-s3", ("train", "val"))
    assert s3.manifest["source"] == f"s3://{s3_bucket}/coco/tiny"
    before = tree_digest(tmp_path / "from-s3")
    again = ingest(f"s3://{s3_bucket}/coco/tiny", tmp_path / "from-s3", s3_endpoint_url=s3_server)
    assert again.skipped and tree_digest(tmp_path / "from-s3") == before  # unchanged listing: no download
    val = json.loads((raw / "annotations" / "instances_val.json").read_text())
    val["annotations"] = val["annotations"][:1]
    import boto3

    boto3.client("s3", endpoint_url=s3_server).put_object(
        Bucket=s3_bucket, Key="coco/tiny/annotations/instances_val.json", Body=json.dumps(val).encode()
    )
    changed = ingest(f"s3://{s3_bucket}/coco/tiny", tmp_path / "from-s3", s3_endpoint_url=s3_server)
    assert not changed.skipped and changed.manifest["splits"]["val"]["annotations"] == 1
    assert synthetic.manifest["source"] == "synthetic"

    out = tmp_path / "from-synthetic"
    assert sorted(p.name for p in out.iterdir()) == [
        "annotations",
        "images",
        "ingest_report.json",
        "manifest.json",
    ]
    for split, count in (("train", 3), ("val", 2)):
        coco = json.loads((raw / "annotations" / f"instances_{split}.json").read_text())
        normalised = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        assert normalised["annotations"] == coco["annotations"]  # valid input passes through unchanged
        assert normalised["images"] == coco["images"]
        assert synthetic.manifest["splits"][split]["images"] == count
        assert synthetic.manifest["splits"][split]["annotations"] == len(coco["annotations"])
        assert sorted(p.name for p in (out / "images" / split).iterdir()) == [
            f"{split}_{i:06d}.png" for i in range(count)
        ]
        assert (out / "images" / split / f"{split}_000000.png").read_bytes() == (
            raw / split / f"{split}_000000.png"
        ).read_bytes()


def test_pennfudan_local_and_s3_give_the_same_layout(tmp_path, pennfudan, s3_server, s3_bucket):
    local = ingest(str(pennfudan), tmp_path / "local", workers=2)
    assert upload(pennfudan, s3_server, s3_bucket, "pennfudan") > 120
    s3 = ingest(f"s3://{s3_bucket}/pennfudan", tmp_path / "s3", s3_endpoint_url=s3_server, workers=4)
    assert_same_dataset(tmp_path / "local", tmp_path / "s3", ("train", "val"))

    for split in ("train", "val"):
        source = COCO(str(pennfudan / "annotations" / f"instances_{split}.json"))
        out = tmp_path / "local"
        assert local.manifest["splits"][split]["images"] == len(source.imgs)
        assert local.manifest["splits"][split]["annotations"] == len(source.anns)
        assert local.manifest["splits"][split]["instances_per_category"] == {"1": len(source.anns)}
        for info in source.imgs.values():  # the JPEGs are 8-bit RGB: copied byte for byte
            assert (out / "images" / split / info["file_name"]).read_bytes() == (
                pennfudan / split / info["file_name"]
            ).read_bytes()
    assert local.manifest["categories"] == [{"id": 1, "name": "person", "supercategory": "person"}]
    assert s3.manifest["splits"]["train"]["images"] == 100


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_reingest_is_a_noop_with_byte_identical_outputs(tmp_path, capsys):
    raw = generate(TINY, tmp_path / "raw")
    out = tmp_path / "data"
    argv = ["ingest", "--source", str(raw), "--out", str(out), "--workers", "2"]
    rc, first, _ = run_cli(argv, capsys)
    assert rc == 0 and "train: 3 images" in first and "0 repaired, 0 quarantined" in first
    before = tree_digest(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    rc, second, _ = run_cli(argv, capsys)
    assert rc == 0
    assert second.strip() == f"{out}: up to date (source unchanged since the last ingest); nothing to do"
    assert tree_digest(out) == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes  # nothing was rewritten

    # --force redoes the work and still produces byte-identical files
    rc, third, _ = run_cli([*argv, "--force"], capsys)
    assert rc == 0 and "up to date" not in third
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "raw"]  # no staging/temp left


def test_reingest_after_a_source_change_redoes_the_work(tmp_path):
    raw = generate(TINY, tmp_path / "raw")
    out = tmp_path / "data"
    first = ingest(str(raw), out, workers=1)
    ann = raw / "annotations" / "instances_val.json"
    coco = json.loads(ann.read_text())
    coco["annotations"] = coco["annotations"][:1]
    ann.write_text(json.dumps(coco))
    second = ingest(str(raw), out, workers=1)
    assert not second.skipped
    assert second.manifest["splits"]["val"]["annotations"] == 1
    assert second.manifest["source_fingerprint"] != first.manifest["source_fingerprint"]
    assert second.manifest["splits"]["train"] == first.manifest["splits"]["train"]
    assert ingest(str(raw), out, workers=1).skipped


def test_fingerprint_is_what_ingest_records_and_follows_the_source(tmp_path, capsys):
    raw = generate(TINY, tmp_path / "raw")
    argv = ["ingest", "--source", str(raw), "--fingerprint"]
    rc, before, _ = run_cli(argv, capsys)
    assert rc == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # nothing written
    recorded = ingest(str(raw), tmp_path / "data", workers=1).manifest["source_fingerprint"]
    assert before.strip() == recorded
    ann = raw / "annotations" / "instances_val.json"
    ann.write_text(ann.read_text() + " ")
    rc, after, _ = run_cli(argv, capsys)
    assert rc == 0 and after.strip() != recorded


def test_synthetic_reingest_via_cli_is_a_noop(tmp_path, capsys):
    out = tmp_path / "syn"
    argv = ["ingest", "--source", "synthetic", "--out", str(out), "--synthetic-train-images", "2"]
    argv += ["--synthetic-val-images", "1", "--synthetic-image-size", "48", "--seed", "5"]
    assert run_cli(argv, capsys)[0] == 0
    before = tree_digest(out)
    rc, text, _ = run_cli(argv, capsys)
    assert rc == 0 and "up to date" in text
    assert tree_digest(out) == before
    m = manifest(out)
    assert m["splits"]["train"]["images"] == 2 and m["splits"]["val"]["images"] == 1
    assert [c["name"] for c in m["categories"]] == ["ellipse", "triangle", "star"][: len(m["categories"])]


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["ingest", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flat = " ".join(text.split())
    actions = [a for a in parser._actions if a.option_strings]
    assert len(actions) >= 19
    for action in actions:
        option = action.option_strings[-1]
        assert re.search(rf"^\s+(-\w, )?{re.escape(option)}\b", text, re.MULTILINE), f"{option} not listed"
        assert action.help, f"{option} has no help text"
        words = " ".join(action.help.split()[:4]).replace("%(default)s", "")
        assert words in flat, f"help of {option} not shown"
    for word in ("s3://bucket/prefix", "coco2017", "synthetic", "exit status"):
        assert word in text


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("s3://no-such-bucket-h1/data", "S3 request failed at endpoint"),
        ("s3://{bucket}/empty", "no objects under this prefix; check the bucket and prefix"),
        ("s3://{bucket}/only-images", "no annotations/instances_train.json"),
    ],
)
def test_s3_errors_are_one_line(source, message, tmp_path, s3_server, s3_bucket, capsys):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).put_object(
        Bucket=s3_bucket, Key="only-images/train/a.png", Body=b"x"
    )
    out = tmp_path / "out"
    argv = [
        "ingest",
        "--source",
        source.format(bucket=s3_bucket),
        "--out",
        str(out),
        "--s3-endpoint-url",
        s3_server,
    ]
    rc, _, err = run_cli(argv, capsys)
    assert rc == 1 and err.count("\n") == 1 and err.startswith("atmask ingest: error: --source s3://")
    assert message in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def http_dir(tmp_path):
    """A folder served over HTTP on 127.0.0.1 (yields (folder, base URL))."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "www"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_archive_source_with_checksum(tmp_path, http_dir, capsys):
    import shutil

    folder, base = http_dir
    raw = generate(TINY, tmp_path / "raw" / "tiny")
    archive = Path(shutil.make_archive(str(folder / "tiny"), "zip", raw.parent))
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    url = f"{base}/tiny.zip#sha256={digest}"
    result = ingest(url, tmp_path / "from-http", cache_dir=cache, workers=2)
    ingest(str(raw), tmp_path / "from-local", workers=2)
    assert_same_dataset(tmp_path / "from-http", tmp_path / "from-local", ("train", "val"))
    assert result.manifest["source"] == f"{base}/tiny.zip"
    assert [p.name.endswith("-tiny.zip") for p in cache.iterdir()] == [True]  # kept for the next run
    assert ingest(url, tmp_path / "from-http", cache_dir=cache).skipped

    bad = "0" * 64
    argv = [
        "ingest",
        "--source",
        f"{base}/tiny.zip",
        "--checksum",
        f"sha256:{bad}",
        "--out",
        str(tmp_path / "x"),
    ]
    rc, _, err = run_cli([*argv, "--cache-dir", str(tmp_path / "cache2")], capsys)
    assert rc == 1 and err.count("\n") == 1
    assert f"sha256 checksum mismatch: expected {bad}, got {digest}" in err
    assert not (tmp_path / "x").exists() and list((tmp_path / "cache2").iterdir()) == []
    rc, _, err = run_cli(["ingest", "--source", f"{base}/missing.zip", "--out", str(tmp_path / "y")], capsys)
    assert rc == 1 and "cannot reach the URL" in err and "404" in err


@pytest.fixture
def ranged_http(tmp_path):
    """Like ``http_dir``, with HTTP Range support (206 / 416) and a log of the Range headers received."""
    import http.server
    import threading

    folder = tmp_path / "ranged"
    folder.mkdir()
    ranges: list[str | None] = []

    class Ranged(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = folder / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            header = self.headers.get("Range")
            if body:
                ranges.append(header)
            start = int(header.split("=")[1].split("-")[0]) if header else 0
            if start >= len(data) and header:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206 if header else 200)
            if header:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            if body:
                self.wfile.write(data[start:])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ranged)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}", ranges
    finally:
        server.shutdown()
        server.server_close()


def test_http_download_resumes_a_partial_file_with_a_range_request(tmp_path, ranged_http):
    from components.ingest_sources import Archive, download

    folder, base, ranges = ranged_http
    payload = bytes(range(256)) * 4000  # ~1 MB
    (folder / "data.zip").write_bytes(payload)
    archive = Archive(f"{base}/data.zip", f"sha256:{hashlib.sha256(payload).hexdigest()}")
    cache = tmp_path / "cache"
    cache.mkdir()
    final = cache / f"{hashlib.sha256(archive.url.encode()).hexdigest()[:12]}-data.zip"
    part = final.with_name(final.name + ".part")

    part.write_bytes(payload[:300_000])  # an interrupted earlier download
    assert download(archive, cache) == final
    assert ranges == ["bytes=300000-"] and final.read_bytes() == payload and not part.exists()

    final.rename(part)  # complete but not yet verified: the server answers 416, nothing is re-sent
    assert download(archive, cache).read_bytes() == payload and ranges[-1] == f"bytes={len(payload)}-"

    ranges.clear()
    assert download(archive, cache) == final and ranges == []  # verified file in the cache: no request


def test_coco2017_source_downloads_the_official_archive_layout_from_a_mirror(
    tmp_path, ranged_http, monkeypatch, capsys
):
    import shutil
    import zipfile

    from components import ingest_sources

    folder, base, _ = ranged_http
    raw = generate(TINY, tmp_path / "raw")
    (folder / "annotations").mkdir()
    (folder / "zips").mkdir()
    with zipfile.ZipFile(folder / "annotations" / "annotations_trainval2017.zip", "w") as zf:
        zf.write(raw / "annotations" / "instances_val.json", "annotations/instances_val2017.json")
    with zipfile.ZipFile(folder / "zips" / "val2017.zip", "w") as zf:
        for image in sorted((raw / "val").iterdir()):
            zf.write(image, f"val2017/{image.name}")
    argv = ["ingest", "--source", "coco2017", "--coco-base-url", base, "--splits", "val"]
    argv += ["--out", str(tmp_path / "coco"), "--cache-dir", str(tmp_path / "cache")]

    rc, _, err = run_cli(argv, capsys)  # the official md5s do not match these stand-in archives
    assert rc == 1 and "annotations_trainval2017.zip: md5 checksum mismatch" in err
    assert not (tmp_path / "coco").exists()

    md5 = {k: hashlib.md5((folder / path).read_bytes()).hexdigest() for k, (path, _) in [
        ("annotations", ingest_sources.COCO2017_ARCHIVES["annotations"]),
        ("val", ingest_sources.COCO2017_ARCHIVES["val"]),
    ]}  # fmt: skip
    patched = {
        k: (path, md5.get(k, digest)) for k, (path, digest) in ingest_sources.COCO2017_ARCHIVES.items()
    }
    monkeypatch.setattr(ingest_sources, "COCO2017_ARCHIVES", patched)
    rc, out, _ = run_cli(argv, capsys)
    assert rc == 0 and "val: 2 images" in out
    local = tmp_path / "local"
    shutil.copytree(raw, local)
    ingest(str(local), tmp_path / "from-local", splits=("val",), workers=1)
    assert_same_dataset(tmp_path / "coco", tmp_path / "from-local", ("val",))
    assert manifest(tmp_path / "coco")["source"] == "coco2017"
