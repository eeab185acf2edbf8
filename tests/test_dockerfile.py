"""The project image: Dockerfile lint (hadolint, checkov), its build context, and ``atmask image``."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from components.errors import UserError
from pipelines import image
from pipelines.main import main as atmask

ROOT = Path(__file__).resolve().parents[1]
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def tool(*candidates: str) -> str:
    """Path of a lint tool; missing tools fail the test unless ATMASK_ALLOW_MISSING_TOOLS=1."""
    for cand in candidates:
        path = shutil.which(cand) or (str(ROOT / cand) if (ROOT / cand).is_file() else None)
        if path:
            return path
    message = f"none of {candidates} found; run .ci/tools.sh (or pip install -e '.[dev]')"
    if os.environ.get("ATMASK_ALLOW_MISSING_TOOLS") == "1":
        pytest.skip(message)
    pytest.fail(message)


def instructions() -> list[tuple[str, str]]:
    lines, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            lines.append((word.upper(), rest))
            current = ""
    return lines


def test_hadolint_passes() -> None:
    hadolint = tool(".venv/bin/hadolint", "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_checkov_dockerfile_has_no_failed_check() -> None:
    checkov = tool(".tools/checkov/bin/checkov", "checkov")
    cmd = [
        checkov,
        "-f",
        str(ROOT / "Dockerfile"),
        "--framework",
        "dockerfile",
        "-o",
        "json",
        "--skip-download",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    report = json.loads(result.stdout)
    summary = report["summary"]
    failed = [c["check_id"] for c in report["results"]["failed_checks"]]
    assert failed == [] and summary["failed"] == 0
    assert summary["passed"] > 50


def test_dockerfile_is_pinned_multistage_nonroot() -> None:
    steps = instructions()
    froms = [rest for word, rest in steps if word == "FROM"]
    assert len(froms) == 2, "build stage + runtime stage"
    for ref in froms:
        assert DIGEST.search(ref.split(" AS ")[0]), f"base image not pinned by digest: {ref}"
    runtime_stage = steps[[i for i, (w, _) in enumerate(steps) if w == "FROM"][-1] :]
    users = [rest for word, rest in runtime_stage if word == "USER"]
    assert users == ["10001:10001"]
    assert ("ENTRYPOINT", '["atmask"]') in steps
    assert not any(w in ("ADD", "ARG") for w, _ in steps)
    assert not any(re.search(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY)", rest) for w, rest in steps if w == "ENV")
    assert any(w == "COPY" and rest.startswith("--from=build /opt/venv") for w, rest in runtime_stage)


def test_image_torch_matches_project_pins() -> None:
    pins = dict(re.findall(r'"(torch|torchvision)==([^"]+)"', (ROOT / "pyproject.toml").read_text()))
    text = (ROOT / "Dockerfile").read_text()
    assert f"torch=={pins['torch']} " in text and f"torchvision=={pins['torchvision']}" in text
    assert "https://download.pytorch.org/whl/cu130" in text  # a CUDA build of that release


def test_build_context_is_only_the_package() -> None:
    from docker.utils.build import exclude_paths

    patterns = [
        p for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    context = set(exclude_paths(str(ROOT), patterns))
    assert {"pyproject.toml", "components/cli.py", "model/builder.py", "pipelines/runtime.py"} <= context
    assert "params.yaml" not in context and not any(
        p.startswith((".venv/", ".git/", "tests/")) for p in context
    )
    top = {p.split("/")[0] for p in context} - {"Dockerfile", ".dockerignore"}  # docker always sends these
    assert top <= {"pyproject.toml", "README.md", "model", "components", "pipelines"}
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in context)
    for _, rest in (s for s in instructions() if s[0] == "COPY" and not s[1].startswith("--from")):
        for src in rest.split()[:-1]:
            assert (ROOT / src).exists() and src.rstrip("/") in top, f"COPY {src} is not in the context"


# ------------------------------------------------------------------ atmask image


def test_image_ref_and_validation() -> None:
    assert image.image_ref("ghcr.io/org/atmask", "abc123") == "ghcr.io/org/atmask:abc123"
    assert image.image_ref("localhost:5000/atmask", "v1.0-rc_1") == "localhost:5000/atmask:v1.0-rc_1"
    with pytest.raises(UserError, match="not a Docker repository"):
        image.image_ref("GHCR.io/Org/ATMask", "x")
    with pytest.raises(UserError, match="--tag 'a b'"):
        image.image_ref("ghcr.io/org/atmask", "a b")


def test_git_tag_is_commit_and_marks_dirty_trees(tmp_path: Path) -> None:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    (tmp_path / "f.txt").write_text("1")
    git("add", "f.txt")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "x")
    commit = git("rev-parse", "HEAD").strip()
    assert image.git_tag(tmp_path) == commit[:12]
    (tmp_path / "f.txt").write_text("2")
    assert image.git_tag(tmp_path) == commit[:12] + "-dirty"
    with pytest.raises(UserError, match="not a git checkout"):
        image.git_tag(tmp_path / "nowhere")


def test_build_without_docker_engine_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/docker.sock")
    assert atmask(["image", "build", "--tag", "t1", "--no-compile"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("atmask image: error: cannot reach the Docker engine (")
    assert err.endswith("start Docker or set DOCKER_HOST") and "\n" not in err


def test_pushed_digest_from_push_events() -> None:
    digest = "sha256:" + "b" * 64
    events = [{"status": "Pushed"}, {"aux": {"Tag": "t1", "Digest": digest, "Size": 1}}]
    assert image.pushed_digest("ghcr.io/org/atmask:t1", events) == f"ghcr.io/org/atmask@{digest}"
    with pytest.raises(UserError, match="denied: requested access"):
        image.pushed_digest("r/a:t", [{"errorDetail": {"message": "denied: requested access"}, "error": ""}])
    with pytest.raises(UserError, match="no digest"):
        image.pushed_digest("r/a:t", [{"status": "Pushed"}])


def test_use_image_rewrites_every_component(tmp_path: Path) -> None:
    ref = "ghcr.io/org/atmask@sha256:" + "c" * 64
    out = image.use_image(ref, tmp_path / "p.yaml", ROOT / "params.yaml")
    spec = next(yaml.safe_load_all(out.read_text()))
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {ref}


def test_push_pins_overlays_to_the_pushed_digest(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s")
    overlays = tmp_path / "k8s" / "overlays"
    pinned = "registry.example.com/team/atmask@sha256:" + "d" * 64
    changed = image.pin_overlays(pinned, overlays)
    targets = ["dev", "prod", "single-user"]  # every overlay (training is a TrainJob the pipeline creates)
    assert [p.parent.relative_to(overlays).as_posix() for p in changed] == targets
    kubectl = tool(".tools/kubectl/bin/kubectl", "kubectl")
    for target in targets:
        text = (overlays / target / "kustomization.yaml").read_text()
        assert text.startswith("# ") and ("patches:" in text or "components:" in text)  # the rest is kept
        out = subprocess.run(
            [kubectl, "kustomize", str(overlays / target)], capture_output=True, text=True, check=True
        ).stdout
        images = set(re.findall(r"image: (\S+)", out))
        assert images == {pinned}, target
    (overlays / "single-user" / "kustomization.yaml").write_text("resources: [../dev]\n")
    with pytest.raises(UserError, match=r"single-user/kustomization\.yaml: no top-level 'images:' list"):
        image.pin_overlays(pinned, overlays)
