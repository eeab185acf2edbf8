"""A nearly full filesystem: ``atmask ingest`` and training checkpoints fail with one line, keep the previous
good state (no half-written dataset, the last good checkpoint still verifies), and work again once space is
back (training resumes).

The filesystem is a size-limited tmpfs mounted for the test when the machine allows it (root, and a kernel
that lets this container mount); otherwise writes under the folder are counted in-process and fail with
``ENOSPC`` past the quota (the fallback is named in the test id's output).
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_train import write_params

from components import checkpoint as ckpt
from components.cli import main
from components.errors import UserError
from components.ingest import ingest
from components.io import write_json_atomic
from components.synthetic import SyntheticConfig, generate

FS_BYTES = 400 * 2**20


class SmallDisk:
    """A folder on a small filesystem: ``fill(leave)`` takes all but ``leave`` bytes, ``free()`` gives them back."""

    def __init__(self, path: Path, mounted: bool) -> None:
        self.path, self.mounted = path, mounted
        self.quota: int | None = None  # fallback only: bytes still writable

    def fill(self, leave: int) -> None:
        if self.mounted:
            filler = self.path / ".filler"
            free = shutil.disk_usage(self.path).free
            with open(filler, "wb") as fh:
                os.posix_fallocate(fh.fileno(), 0, max(0, free - leave))
        else:
            self.quota = leave

    def free(self) -> None:
        (self.path / ".filler").unlink(missing_ok=True)
        self.quota = None


class _QuotaFile:
    """A file opened for writing under the fallback folder: writes past the quota raise ENOSPC."""

    def __init__(self, fh, disk: SmallDisk) -> None:
        self._fh, self._disk = fh, disk

    def write(self, data) -> int:
        if self._disk.quota is not None:
            if len(data) > self._disk.quota:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._fh.name)
            self._disk.quota -= len(data)
        return self._fh.write(data)

    def __getattr__(self, name: str):
        return getattr(self._fh, name)

    def __enter__(self) -> _QuotaFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SmallDisk]:
    path = tmp_path / "fs"
    path.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES}", "tmpfs", str(path)]
    mounted = (
        not os.environ.get(
            "ATMASK_TEST_INJECT_ENOSPC"
        )  # set it to exercise the fallback where mounting works
        and os.geteuid() == 0
        and subprocess.run(mount, capture_output=True).returncode == 0
    )
    disk = SmallDisk(path, mounted)
    if not mounted:
        print("no tmpfs mount allowed here: ENOSPC is injected in-process")
        real_open = builtins.open

        def quota_open(file, mode="r", *args, **kwargs):
            fh = real_open(file, mode, *args, **kwargs)
            under = isinstance(file, (str, os.PathLike)) and str(Path(file).resolve()).startswith(str(path))
            return _QuotaFile(fh, disk) if under and any(m in mode for m in "wax+") else fh

        monkeypatch.setattr(builtins, "open", quota_open)
        monkeypatch.setattr(io, "open", quota_open)
    try:
        yield disk
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_atomic_json_write_on_a_full_disk_keeps_the_previous_file(small_disk: SmallDisk) -> None:
    target = small_disk.path / "report.json"
    write_json_atomic(target, {"version": 1})
    small_disk.fill(leave=4096)
    with pytest.raises(UserError, match=f"^{target}: no space left on device .*previous version"):
        write_json_atomic(target, {"blob": "x" * 2**20})
    assert json.loads(target.read_text()) == {"version": 1}
    assert sorted(p.name for p in small_disk.path.iterdir() if p.name != ".filler") == ["report.json"]


def test_ingest_on_a_full_disk_keeps_the_previous_dataset_and_works_once_space_is_back(
    small_disk: SmallDisk, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    raw = generate(SyntheticConfig(train_images=24, val_images=6, image_size=128, seed=1), tmp_path / "raw")
    out = small_disk.path / "data" / "coco"
    argv = ["ingest", "--source", str(raw), "--out", str(out), "--workers", "2", "--force"]
    assert main(argv) == 0
    before = _files(out)
    dataset_bytes = sum(len(b) for b in before.values())

    small_disk.fill(leave=dataset_bytes // 3)
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"atmask ingest: error: {out}: no space left on device (")
    assert "its previous version, if any, is unchanged; free some space and run the same command again" in err
    assert _files(out) == before  # the previous good dataset, byte for byte
    assert sorted(p.name for p in out.parent.iterdir()) == ["coco"]  # no temp, staging or failure report

    small_disk.free()
    assert main(argv) == 0
    assert _files(out).keys() == before.keys()
    result = ingest(str(raw), out, splits=("train", "val"), workers=1)
    assert result.skipped and result.manifest["splits"]["train"]["images"] == 24


@pytest.mark.slow
def test_checkpoint_on_a_full_disk_keeps_the_last_good_one_and_training_resumes(
    small_disk: SmallDisk, tiny_coco: Path, tmp_path: Path, local_tracking: str, capsys: pytest.CaptureFixture
) -> None:
    params = write_params(tmp_path / "params.yaml", checkpoint_every=2, iterations=8)
    run = small_disk.path / "run"
    argv = [
        "train",
        "--config",
        "baseline",
        "--params",
        str(params),
        "--data",
        str(tiny_coco),
        "--out",
        str(run),
    ]
    assert main([*argv, "--iterations", "4"]) == 0
    good = ckpt.checkpoint_path(run, 4)
    size = good.stat().st_size

    small_disk.fill(leave=size // 2)  # room for logs, not for the next checkpoint
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"atmask train: error: {ckpt.checkpoint_path(run, 6)}: no space left on device "
        + err[0].split(" on device ", 1)[1]
    ]
    assert "it was not written and its previous version, if any, is unchanged" in err[0]
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["ckpt_00000004.pt", "ckpt_00000002.pt"]
    state, path = ckpt.load_latest_checkpoint(run)  # verifies the sidecar
    assert path == good and state["iteration"] == 4
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary file holds the space

    small_disk.free()
    assert main(argv) == 0
    log = json.loads((run / "train_log.json").read_text())
    assert log["summary"]["resumed_from"] == 4 and log["summary"]["iterations"] == 8
    assert [r["iteration"] for r in log["log"]] == list(range(1, 9))
    assert ckpt.load_latest_checkpoint(run)[0]["iteration"] == 8
