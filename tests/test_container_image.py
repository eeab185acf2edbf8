"""The images are real: built from a local Debian base with ``atmask image build``, they hold exactly
constraints.txt's versions and no build secret, and the atmask image runs the CLI as Kubernetes runs it
(read-only root, uid 10001, no capabilities). Also, without Docker: the package installed from its wheel,
not editable, runs ``atmask`` in an isolated interpreter (the image's way; an editable install once hid a
missing ``import importlib.util``)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import yaml
from fixtures_docker import DOCKER, RESTRICTED, build_image, docker, pod_dir

ROOT = Path(__file__).resolve().parents[1]
# a cold image build (about 5 min here, more on a busy machine) runs in the first test's set-up
pytestmark = pytest.mark.timeout(2400)
# the mlflow target's packages that constraints.txt does not pin (the Dockerfile does)
MLFLOW_EXTRA_PINS = {"psycopg": "3.3.9", "psycopg-binary": "3.3.9", "flask-wtf": "1.3.0", "wtforms": "3.3.2"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[_norm(name)] = version.strip()
    return pins


def frozen(image: str) -> dict[str, str]:
    out = docker("run", "--rm", *RESTRICTED, "--entrypoint", "pip", image, "freeze", "--all").stdout
    versions = {}
    for line in out.splitlines():
        name, sep, version = line.partition("==")
        if sep:
            versions[_norm(name)] = version
        else:
            versions[_norm(line.split(" @ ")[0])] = "local"
    return versions


def test_installed_wheel_runs_in_isolated_mode(tmp_path: Path) -> None:
    """Wheel of the package (what the image installs) in a bare venv: `atmask --help` and `--version`."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("model", "components", "pipelines"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    wheel = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(dist),
        str(src),
    ]
    subprocess.run(wheel, check=True, capture_output=True, text=True)
    (whl,) = dist.glob("atmask-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    site = next(env_dir.glob("lib/python3*/site-packages"))
    install = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-compile",
        "--target",
        str(site),
        str(whl),
    ]
    subprocess.run(install, check=True, capture_output=True, text=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    code = "import sys; from pipelines.main import main; sys.exit(main(sys.argv[1:]))"  # the console script
    out = {}
    for flag in ("--help", "--version"):
        done = subprocess.run(
            [str(env_dir / "bin" / "python"), "-I", "-c", code, flag],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        out[flag] = done.stdout
    assert out["--version"].strip() == "atmask 0.1.0"
    listed = re.findall(r"^  (\w+) ", out["--help"], re.MULTILINE)
    assert listed == [
        "ingest",
        "pull",
        "train",
        "evaluate",
        "report",
        "register",
        "promote",
        "predict",
        "pipeline",
        "image",
    ]


@pytest.mark.container
def test_atmask_image_holds_exactly_the_constraints(atmask_image: str) -> None:
    pins, versions = constraints(), frozen(atmask_image)
    assert versions.pop("atmask") == "local"
    for tool in ("pip", "setuptools", "wheel"):  # the venv's own installers; constraints.txt leaves them out
        versions.pop(tool, None)
    differ = {n: (v, pins.get(n)) for n, v in versions.items() if pins.get(n) != v.split("+")[0]}
    assert differ == {}, "image version != constraints.txt version (None: not in constraints.txt)"
    assert {"torch", "torchvision", "mlflow", "kfp", "numba"} <= set(versions)


@pytest.mark.container
def test_mlflow_image_holds_exactly_the_constraints_and_no_torch(mlflow_image: str) -> None:
    pins, versions = {**constraints(), **MLFLOW_EXTRA_PINS}, frozen(mlflow_image)
    for tool in ("pip", "setuptools", "wheel"):
        versions.pop(tool, None)
    differ = {n: (v, pins.get(n)) for n, v in versions.items() if pins.get(n) != v}
    assert differ == {}
    assert versions["mlflow"] == pins["mlflow"] and versions["boto3"] == pins["boto3"]
    assert not {"torch", "torchvision", "triton"} & set(versions) and not any(
        n.startswith("nvidia") for n in versions
    )
    text = (ROOT / "Dockerfile").read_text()
    for name, version in MLFLOW_EXTRA_PINS.items():
        if name != "psycopg-binary":
            assert re.search(rf"{name}(\[binary\])?=={re.escape(version)}", text, re.IGNORECASE), name


@pytest.mark.container
def test_the_ca_secret_stays_out_of_both_images(
    atmask_image: str, mlflow_image: str, base_image: str
) -> None:
    """The bundle given as the "ca" build secret: no file with its content beyond those the base image
    already has (Debian's own bundle may be identical), nothing in /run/secrets, config or history."""
    ca = Path(os.environ.get("ATMASK_TEST_CA_FILE") or "/etc/ssl/certs/ca-certificates.crt")
    if not ca.is_file():
        pytest.skip(f"{ca}: no CA bundle was passed to the build")
    digest, size = hashlib.sha256(ca.read_bytes()).hexdigest(), ca.stat().st_size
    script = (
        f"find / -xdev -type f -size {size}c -exec sha256sum {{}} + 2>/dev/null | grep {digest} | cut -d' ' -f3;"
        ' test -z "$(ls -A /run/secrets 2>/dev/null)"'  # BuildKit leaves the empty mount point
    )

    def copies(image: str) -> set[str]:
        done = docker("run", "--rm", "--user", "0", "--entrypoint", "sh", image, "-c", script)
        return set(done.stdout.split())

    in_base = copies(base_image)
    for image in (atmask_image, mlflow_image):
        assert copies(image) - in_base == set(), image
        config = json.loads(docker("image", "inspect", image).stdout)[0]["Config"]
        assert not any(
            e.startswith(("PIP_CERT", "REQUESTS_CA", "SSL_CERT", "PIP_INDEX")) for e in config["Env"]
        )
        history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
        assert "ca-certificates.crt" not in history and str(ca) not in history


@pytest.mark.container
@pytest.mark.integration
def test_atmask_runs_as_kubernetes_runs_it(atmask_image: str, mlflow_server: str) -> None:
    """--help, then ingest (synthetic) into a mounted volume, a few training iterations, evaluate: each in
    its own restricted container, as the pipeline's pods are (host network: the tracking server)."""
    from fixtures_train import TINY_PARAMS

    work = pod_dir("atmask-pod-")
    try:
        raw = yaml.safe_load(yaml.safe_dump(TINY_PARAMS))
        raw["recipes"]["tiny"].update(iterations=3, warmup_iters=1, lr_steps=[2], checkpoint_every=2)
        raw["mlflow"]["experiment"] = "container-pod-test"
        (work / "params.yaml").write_text(yaml.safe_dump(raw))
        run = [DOCKER, "run", "--rm", *RESTRICTED, "--network", "host", "-v", f"{work}:/work", "-w", "/work"]
        run += ["-e", f"MLFLOW_TRACKING_URI={mlflow_server}", atmask_image]
        helped = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=120)
        assert helped.returncode == 0 and "commands:" in helped.stdout, helped.stderr
        synthetic = [
            "--synthetic-train-images",
            "6",
            "--synthetic-val-images",
            "3",
            "--synthetic-image-size",
            "64",
        ]
        steps = [
            ["ingest", "--source", "synthetic", "--out", "data", "--params", "params.yaml", *synthetic],
            [
                "train",
                "--config",
                "atmask",
                "--params",
                "params.yaml",
                "--data",
                "data",
                "--out",
                "runs/atmask",
            ],
            ["evaluate", "--run", "runs/atmask", "--data", "data", "--params", "params.yaml"],
        ]
        for argv in steps:
            done = subprocess.run([*run, *argv], capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"atmask {argv[0]}: {done.stderr[-3000:]}"
        assert json.loads((work / "data" / "manifest.json").read_text())["checksum"]
        metrics = json.loads((work / "runs" / "atmask" / "metrics.json").read_text())
        assert 0.0 <= metrics["segm/AP"] <= 1.0
        assert (work / "runs" / "atmask" / "model.pt").stat().st_uid == 10001  # written by the pod user
    finally:
        if os.geteuid() != 0:  # the pod user's files: removed by that user
            clean = ["run", "--rm", "--user", "10001", "-v", f"{work}:/w", "--entrypoint", "rm", atmask_image]
            docker(*clean, "-rf", "/w/data", "/w/runs", "/w/params.yaml", check=False)
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.container
def test_image_build_bad_input_is_one_line(docker_engine: str, tmp_path: Path) -> None:
    """A base image that is nowhere, then a build step that fails: one line naming what and what to do."""
    for extra, expected in (
        (
            ["--base-image", "atmask-nowhere:none"],
            r"^atmask image: error: base image atmask-nowhere:none: not in the engine and pulling it failed \(.*\); make a local one .*bash \.ci/docker\.sh base",
        ),
        (
            ["--torch-index-url", "file:///nonexistent/simple", "--tag", "bad"],
            r"^atmask image: error: docker build of atmask:bad failed at step \[venv 1/2\] RUN \. /tmp/pip-env\.sh && pip install --index-url .* \(exit code 1\); its log is above; behind a TLS-inspecting proxy pass --ca-file",
        ),
    ):
        proc = build_image("atmask", tmp_path / "bad.log", extra)
        assert proc.returncode == 1
        (line,) = proc.stderr.strip().splitlines()
        assert re.search(expected, line), line
    assert docker("image", "inspect", "atmask:bad", check=False).returncode != 0


def test_run_local_docker_needs_a_tracking_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.main import main

    argv = ["pipeline", "run-local", "--runner", "docker", "--workdir", str(tmp_path / "w"), "--image", "x:y"]
    assert main([*argv, "--params", str(ROOT / "params.yaml")]) == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(
        r"atmask pipeline: error: --mlflow-tracking-uri sqlite:///\S+/w/mlflow\.db: --runner docker needs a "
        r"tracking server \(http://host:port\) that the containers reach; start one with 'mlflow server'",
        err,
    ), err
    assert not (tmp_path / "w").exists()  # nothing made before the inputs are checked


@pytest.mark.container
def test_run_local_docker_needs_a_local_image(
    docker_engine: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipelines.main import main

    argv = ["pipeline", "run-local", "--runner", "docker", "--workdir", str(tmp_path / "w")]
    argv += ["--image", "atmask-nowhere:none", "--mlflow-tracking-uri", "http://127.0.0.1:9"]
    assert main([*argv, "--params", str(ROOT / "params.yaml")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "atmask pipeline: error: --image atmask-nowhere:none: not in the local Docker engine; build it with "
        "'atmask image build --repository REPO --tag TAG --no-compile' and pass --image REPO:TAG"
    )
    assert not (tmp_path / "w").exists()
