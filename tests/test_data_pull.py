"""DVC-versioned data by hash: `atmask pull` against what the real `dvc push` wrote to an S3 remote (moto's
server), DVC's folder hash computed the same way, and a run's data version found on every path."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import boto3
import pytest
from fixtures_dvc import DvcRepo, make_dvc_repo

from components import provenance
from components.data_pull import pull
from components.errors import UserError
from components.provenance import DataVersion, data_version, dir_md5, file_md5, object_uri
from pipelines.main import main as atmask

pytestmark = pytest.mark.integration


@pytest.fixture
def s3_env(dvc_repo: DvcRepo, monkeypatch: pytest.MonkeyPatch) -> DvcRepo:
    monkeypatch.setenv("AWS_ENDPOINT_URL", dvc_repo.endpoint)  # what the atmask-s3 Secret sets on a cluster
    return dvc_repo


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): file_md5(p) for p in folder.rglob("*") if p.is_file()}


def test_folder_hash_is_the_one_dvc_lock_records(dvc_repo: DvcRepo) -> None:
    assert dir_md5(dvc_repo.path / "data" / "coco") == dvc_repo.md5
    version = data_version(dvc_repo.path / "data" / "coco")  # the `dvc repro` path: dvc.lock's entry
    assert version == DataVersion(dvc_repo.md5, object_uri(dvc_repo.remote, dvc_repo.md5), "data/coco")
    assert version.source.startswith(f"{dvc_repo.remote}/files/md5/{dvc_repo.md5[:2]}/")


def test_pull_fetches_exactly_the_pushed_version(s3_env: DvcRepo, tmp_path: Path) -> None:
    root = tmp_path / "datasets"
    assert atmask(["pull", "--md5", s3_env.md5, "--remote", s3_env.remote, "--root", str(root)]) == 0
    folder = root / s3_env.md5.removesuffix(".dir")
    assert _tree(folder) == _tree(s3_env.path / "data" / "coco")
    record = json.loads(folder.with_name(folder.name + ".json").read_text())
    assert record["md5"] == s3_env.md5 and record["nfiles"] == len(_tree(folder))
    assert data_version(folder) == DataVersion(s3_env.md5, object_uri(s3_env.remote, s3_env.md5), "data/coco")
    assert not os.access(folder / "manifest.json", os.W_OK) or os.getuid() == 0
    assert not stat.S_IMODE((folder / "manifest.json").stat().st_mode) & 0o222  # read-only files
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_a_pulled_version_is_reused_without_the_remote(s3_env: DvcRepo, tmp_path: Path) -> None:
    root = tmp_path / "datasets"
    first = pull(s3_env.md5, s3_env.remote, root)
    second = pull(s3_env.md5, "s3://no-such-bucket-anywhere/dvc", root)  # never contacted
    assert first == second


def test_a_version_not_in_the_remote_is_one_line(s3_env: DvcRepo, tmp_path: Path, capsys) -> None:
    missing = "0" * 32 + ".dir"
    argv = ["pull", "--md5", missing, "--remote", s3_env.remote, "--root", str(tmp_path / "d")]
    assert atmask(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith(
        f"atmask pull: error: DVC remote {s3_env.remote}: data version {missing} is not there"
    )
    assert "dvc push" in err and not list((tmp_path / "d").glob("*"))
    assert atmask(["pull", "--md5", "abc", "--remote", s3_env.remote, "--root", str(tmp_path / "d")]) == 1
    assert "not a DVC folder hash" in capsys.readouterr().err


def test_a_corrupt_remote_object_is_detected(dvc_repo: DvcRepo, tmp_path: Path, monkeypatch) -> None:
    """A second push of the same data to a fresh bucket, one file object overwritten: the pull names it."""
    s3 = boto3.client("s3", endpoint_url=dvc_repo.endpoint)
    s3.create_bucket(Bucket="corrupt-remote")
    repo = tmp_path / "repo"
    make_dvc_repo(repo, "s3://corrupt-remote/dvc", dvc_repo.endpoint)
    listing = json.loads(s3.get_object(Bucket="corrupt-remote", Key=_key(dvc_repo.md5))["Body"].read())
    victim = next(e for e in listing if e["relpath"] == "manifest.json")
    s3.put_object(Bucket="corrupt-remote", Key=_key(victim["md5"]), Body=b"{}")
    monkeypatch.setenv("AWS_ENDPOINT_URL", dvc_repo.endpoint)
    with pytest.raises(UserError, match=r"\(manifest.json\) has md5 [0-9a-f]{32}, the listing says"):
        pull(dvc_repo.md5, "s3://corrupt-remote/dvc", tmp_path / "datasets")
    assert list((tmp_path / "datasets").iterdir()) == []


def _key(md5: str) -> str:
    return f"dvc/files/md5/{md5[:2]}/{md5[2:]}"


def test_a_local_remote_works_too(dvc_repo: DvcRepo, tmp_path: Path) -> None:
    """`atmask pipeline run-local` with the repository's default local remote."""
    store = tmp_path / "store"
    shutil.copytree(dvc_repo.path / ".dvc" / "cache", store)  # a local remote has the cache's layout
    folder = pull(dvc_repo.md5, str(store), tmp_path / "datasets")
    assert _tree(folder) == _tree(dvc_repo.path / "data" / "coco")


def test_an_unwritable_root_is_one_line(s3_env: DvcRepo, tmp_path: Path) -> None:
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    if os.access(root, os.W_OK):
        pytest.skip("running as root: permissions are not enforced")
    with pytest.raises(UserError, match=r"ro: cannot write the dataset folder as uid \d+"):
        pull(s3_env.md5, s3_env.remote, root)


def test_source_tags_come_from_git_or_the_pipeline(
    monkeypatch: pytest.MonkeyPatch, dvc_repo: DvcRepo
) -> None:
    monkeypatch.chdir(dvc_repo.path)
    tags = provenance.source_tags("atmask train")
    assert len(tags["mlflow.source.git.commit"]) == 40
    assert tags["mlflow.source.name"] == "https://github.com/atmask-rcnn/atmask.git"
    assert tags["mlflow.source.type"] == "LOCAL"
    monkeypatch.setenv("ATMASK_GIT_COMMIT", "a" * 40)
    monkeypatch.setenv("ATMASK_GIT_REPO", "https://user:secret@example.com/org/atmask.git")
    monkeypatch.setenv("ATMASK_SOURCE_TYPE", "JOB")
    tags = provenance.source_tags("atmask train")
    assert tags == {
        "mlflow.source.git.commit": "a" * 40,
        "mlflow.source.name": "https://example.com/org/atmask.git",
        "mlflow.source.type": "JOB",
        "mlflow.source.git.repoURL": "https://example.com/org/atmask.git",
    }
