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
from pipelines import image, names
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


def stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions per stage name (``FROM x AS name``), in file order."""
    found: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for word, rest in instructions():
        if word == "FROM":
            current = found.setdefault(rest.split(" AS ")[-1].strip(), [])
        current.append((word, rest))
    return found


def test_dockerfile_is_pinned_multistage_nonroot() -> None:
    steps = instructions()
    text = (ROOT / "Dockerfile").read_text()
    (base,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base.startswith("python:3.11-slim-bookworm@") and DIGEST.search(base), base
    by_stage = stages()
    assert list(by_stage) == [
        "wheelhouse",
        "base",
        "venv",
        "wheel",
        "mlflow",
        "atmask",
    ]  # atmask: the default
    froms = {name: body[0][1].split(" AS ")[0] for name, body in by_stage.items()}
    assert froms == {
        "wheelhouse": "scratch",
        "base": "${BASE_IMAGE}",
        "venv": "base",
        "wheel": "venv",
        "mlflow": "base",
        "atmask": "venv",
    }
    for target in ("mlflow", "atmask"):
        body = by_stage[target]
        assert [rest for word, rest in body if word == "USER"] == ["10001:10001"]
        assert ("HEALTHCHECK", "NONE") in body
        assert not any(w == "COPY" and "--from=" in rest for w, rest in body), "only mounts from stages"
    assert ("ENTRYPOINT", '["atmask"]') in by_stage["atmask"] and ("ENTRYPOINT", '["mlflow"]') in by_stage[
        "mlflow"
    ]
    assert not any(w == "ADD" for w, _ in steps)
    assert not any(
        re.search(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|CERT)", rest) for w, rest in steps if w == "ENV"
    )


def test_pip_steps_use_constraints_ca_secret_cache_and_wheelhouse() -> None:
    """Every networked pip step: constraints.txt, the optional CA secret, the wheelhouse, a cache mount; the
    CA file only ever as a secret mount, never copied into a layer."""
    pip_steps = [
        rest for word, rest in instructions() if word == "RUN" and re.search(r"\bpip (install|wheel)", rest)
    ]
    assert len(pip_steps) == 5
    networked = [r for r in pip_steps if "--no-index" not in r]
    assert len(networked) == 4
    for rest in networked:
        for mount in (
            "--mount=type=secret,id=ca ",
            "--mount=type=bind,from=wheelhouse,target=/wheelhouse ",
            "--mount=type=cache,target=/root/.cache/pip,sharing=locked ",
            "--mount=type=bind,source=container/pip-env.sh,target=/tmp/pip-env.sh ",
        ):
            assert mount in rest, (mount, rest[:80])
        assert ". /tmp/pip-env.sh" in rest
        if "pip install" in rest:
            assert "-c /tmp/constraints.txt" in rest
    env_script = (ROOT / "container" / "pip-env.sh").read_text()
    assert (
        "PIP_CERT=/run/secrets/ca" in env_script and "PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse" in env_script
    )
    assert not any(
        "ca-certificates" in rest or "/run/secrets" in rest for w, rest in instructions() if w != "RUN"
    )


def test_image_torch_matches_project_pins() -> None:
    pins = dict(re.findall(r'"(torch|torchvision)==([^"]+)"', (ROOT / "pyproject.toml").read_text()))
    constraints = dict(
        re.findall(r"^(torch|torchvision)==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    )
    assert constraints == pins  # the image installs with constraints.txt
    text = (ROOT / "Dockerfile").read_text()
    assert (
        "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130" in text
    )  # a CUDA build of that release
    assert 'pip install --index-url "$TORCH_INDEX_URL" -c /tmp/constraints.txt torch torchvision' in text


def test_build_context_is_only_the_package() -> None:
    from docker.utils.build import exclude_paths

    patterns = [
        p for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    context = set(exclude_paths(str(ROOT), patterns))
    assert {"pyproject.toml", "constraints.txt", "components/cli.py", "model/builder.py"} <= context
    assert {"pipelines/runtime.py", "container/pip-env.sh", "container/wait_for_db.py"} <= context
    assert "params.yaml" not in context and not any(
        p.startswith((".venv/", ".git/", "tests/", ".tools/")) for p in context
    )
    top = {p.split("/")[0] for p in context} - {"Dockerfile", ".dockerignore"}  # docker always sends these
    package = {
        "pyproject.toml",
        "README.md",
        "constraints.txt",
        "model",
        "components",
        "pipelines",
        "container",
    }
    assert top <= package | {"wheelhouse"}
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in context)
    for _, rest in (s for s in instructions() if s[0] == "COPY"):
        for src in rest.split()[:-1]:
            if src.startswith("--") or src == "wheelhouse*":
                continue
            assert (ROOT / src).exists() and src.split("/")[0] in top, f"COPY {src} is not in the context"
    for src in re.findall(r"--mount=type=bind,source=(\S+?),", (ROOT / "Dockerfile").read_text()):
        assert src in context, f"bind mount {src} is not in the context"


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
    server = "registry.example.com/team/atmask-mlflow@sha256:" + "e" * 64
    changed = image.pin_overlays(pinned, overlays)
    targets = ["dev", "prod", "single-user"]  # every overlay (training is a TrainJob the pipeline creates)
    assert [p.parent.relative_to(overlays).as_posix() for p in changed] == targets
    changed = image.pin_overlays(server, overlays, image.TARGETS["mlflow"])
    assert [p.parent.relative_to(overlays).as_posix() for p in changed] == targets  # the server
    kubectl = tool(".tools/kubectl/bin/kubectl", "kubectl")
    for target in targets:
        text = (overlays / target / "kustomization.yaml").read_text()
        assert text.startswith("# ") and ("patches:" in text or "components:" in text)  # the rest is kept
        out = subprocess.run(
            [kubectl, "kustomize", str(overlays / target)], capture_output=True, text=True, check=True
        ).stdout
        images = set(re.findall(r"image: (\S+)", out))
        assert images == {server}, target  # the MLflow server; components run in the pipeline's pods
    assert len(image.pin_overlays(pinned, overlays)) == 3  # again: idempotent
    (overlays / "single-user" / "kustomization.yaml").write_text("resources: [../dev]\n")
    with pytest.raises(UserError, match=r"single-user/kustomization\.yaml: no top-level 'images:' list"):
        image.pin_overlays(pinned, overlays)


def test_buildkit_failure_names_the_step() -> None:
    log = [
        "#9 41.2 ERROR: Could not find a version that satisfies the requirement torch==2.14.1",
        "------",
        " > [venv 1/2] RUN --mount=type=secret,id=ca     --mount=type=cache,target=/root/.cache/pip "
        '. /tmp/pip-env.sh     && pip install --index-url "https://x" -c /tmp/constraints.txt torch torchvision:',
        "------",
        "failed to solve with frontend dockerfile.v0: failed to build LLB: executor failed running "
        "[/bin/bash -o pipefail -c . /tmp/pip-env.sh && pip install]: exit code: 1",
    ]
    message = image.failed_step("atmask:t", log)
    assert message.startswith(
        "docker build of atmask:t failed at step [venv 1/2] RUN . /tmp/pip-env.sh && pip install"
    )
    assert "(exit code 1); its log is above; behind a TLS-inspecting proxy pass --ca-file" in message
    assert "\n" not in message
    assert image.failed_step("atmask:t", ["", "ERROR: failed to stat secret", ""]) == (
        "docker build of atmask:t failed: ERROR: failed to stat secret"
    )


def test_build_inputs_are_checked_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--ca-file .*nowhere\.pem: cannot read it"):
        image.check_ca_file(tmp_path / "nowhere.pem")
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(UserError, match="no PEM certificate"):
        image.check_ca_file(tmp_path / "bad.pem")
    with pytest.raises(UserError, match=r"--wheelhouse .*: no \*\.whl files"):
        image.fill_wheelhouse(tmp_path, tmp_path / "wheelhouse")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "a-1.0-py3-none-any.whl").write_text("x")
    (tmp_path / "wheelhouse").mkdir()
    (tmp_path / "wheelhouse" / "old-1.0-py3-none-any.whl").write_text("y")
    image.fill_wheelhouse(tmp_path / "w", tmp_path / "wheelhouse")
    assert [p.name for p in (tmp_path / "wheelhouse").iterdir()] == ["a-1.0-py3-none-any.whl"]
    assert image.dockerfile_default("BASE_IMAGE", ROOT / "Dockerfile").startswith(
        "python:3.11-slim-bookworm@sha256:"
    )
    assert (
        image.dockerfile_default("TORCH_INDEX_URL", ROOT / "Dockerfile")
        == "https://download.pytorch.org/whl/cu130"
    )


def test_image_and_compile_work_on_the_checkout_not_the_installed_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The package is installed (not editable) in CI and in the image: the Dockerfile, the k8s overlays and
    the compiled pipeline a command builds from or writes are the checkout's, found from the working
    directory, never site-packages' (CI once failed on a Dockerfile looked for next to the package)."""
    monkeypatch.chdir(tmp_path)
    assert atmask(["image", "build", "--no-compile", "--tag", "t"]) == 1
    err = capsys.readouterr().err
    assert f"the working directory {tmp_path}: not a checkout of the project" in err
    assert "--context" in err and "Traceback" not in err
    assert names.compiled_pipeline() == names.COMPILED  # outside a checkout: the installed copy
    assert image.build_context(ROOT / "k8s" / "base") == ROOT
    monkeypatch.chdir(ROOT / "pipelines")
    assert image.build_context(None) == ROOT
    assert names.compiled_pipeline() == ROOT / "pipelines" / names.COMPILED.name


def test_buildkit_client_is_buildx_or_a_20_10_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client >= 23 without buildx cannot build with BuildKit (DOCKER_BUILDKIT=1 fails); Debian's 20.10 can."""

    def fake(name: str, version: str, buildx: bool) -> Path:
        path = tmp_path / name
        path.write_text(
            "#!/bin/sh\n"
            f'[ "$1" = buildx ] && {{ {"echo buildx v0.20" if buildx else "exit 1"}; exit; }}\n'
            f'[ "$1" = --version ] && echo "Docker version {version}, build x"\n'
        )
        path.chmod(0o755)
        return path

    new, old, plugin = (
        fake("new", "28.2.2", False),
        fake("old", "20.10.24+dfsg1", False),
        fake("bx", "28.2.2", True),
    )
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for cli, expected in ((old, [str(old), "build"]), (plugin, [str(plugin), "buildx", "build", "--load"])):
        monkeypatch.setenv(image.CLI_ENV, str(cli))
        cmd, env = image.buildkit_cli()
        assert cmd == expected and env["DOCKER_BUILDKIT"] == "1"
    monkeypatch.setenv(image.CLI_ENV, str(new))
    monkeypatch.setattr(image, "SYSTEM_DOCKER", str(tmp_path / "missing"))
    with pytest.raises(
        UserError, match=r"no docker client here builds with BuildKit: install Debian's docker\.io"
    ):
        image.buildkit_cli()
