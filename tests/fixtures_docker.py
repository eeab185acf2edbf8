"""A Docker engine, the project's two images and a PostgreSQL server for the container tests (``container``).

``docker_engine`` runs ``.ci/docker.sh engine``: when no engine answers it installs Debian's docker.io and
starts dockerd; only when that is impossible here (not root, no apt-get, dockerd cannot run) the tests skip,
with the script's one-line reason. ``base_image`` is ``atmask-base:bookworm`` from Debian's packages (made
once). ``atmask_image`` / ``mlflow_image`` run ``atmask image build`` on this checkout every session, so the
tests always see the current code (BuildKit reuses every unchanged layer: seconds when nothing changed).
Build inputs from the environment: ATMASK_TEST_TORCH_INDEX_URL (default PyPI, the same CUDA 13.0 wheels as
PyTorch's index), ATMASK_TEST_CA_FILE (default Debian's bundle, when present), ATMASK_TEST_WHEELHOUSE.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKER = "/usr/bin/docker"  # Debian's client (.ci/docker.sh installs it); BuildKit goes through atmask image
BASE_IMAGE = "atmask-base:bookworm"
IMAGES = {"atmask": "atmask:test", "mlflow": "atmask-mlflow:test"}
POD_USER = "10001:10001"
# how Kubernetes runs every pod of k8s/ (securityContext): the flags of `docker run`
RESTRICTED = [
    "--read-only",
    "--tmpfs",
    "/tmp:rw,exec,nosuid,nodev",
    "--user",
    POD_USER,
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
]
DEBIAN_CA = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_SECONDS: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter) -> None:
    if BUILD_SECONDS:
        built = ", ".join(f"{IMAGES[t]} {s:.0f} s" for t, s in BUILD_SECONDS.items())
        terminalreporter.write_line(f"container images built (atmask image build): {built}")


def docker(*args: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [DOCKER, *args], capture_output=True, text=True, timeout=timeout, check=False, **kw
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args[:4])}... exited {result.returncode}: {result.stderr[-3000:]}"
        )
    return result


def _setup(step: str) -> None:
    result = subprocess.run(
        ["bash", str(REPO_ROOT / ".ci" / "docker.sh"), step], capture_output=True, text=True, check=False
    )
    last = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
    if result.returncode == 77:
        pytest.skip(f"no Docker engine: {last}")
    if result.returncode != 0:
        raise RuntimeError(
            f".ci/docker.sh {step} failed ({result.returncode}): {result.stdout[-2000:]}{result.stderr[-2000:]}"
        )


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """Path of the docker client once an engine answers (installed and started here when needed)."""
    _setup("engine")
    return DOCKER


@pytest.fixture(scope="session")
def base_image(docker_engine: str) -> str:
    _setup("base")
    return BASE_IMAGE


def build_image(target: str, log: Path, extra: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """``atmask image build`` of this checkout, as a user runs it; its output goes to ``log``."""
    cmd = [sys.executable, "-m", "pipelines.main", "image", "build", "--target", target, "--no-compile"]
    repository, tag = IMAGES[target].split(":")
    cmd += ["--repository", repository, "--tag", tag, "--base-image", BASE_IMAGE]
    ca = os.environ.get("ATMASK_TEST_CA_FILE") or (str(DEBIAN_CA) if DEBIAN_CA.is_file() else "")
    cmd += ["--ca-file", ca] if ca else []
    if target == "atmask":
        cmd += ["--torch-index-url", os.environ.get("ATMASK_TEST_TORCH_INDEX_URL", "https://pypi.org/simple")]
    if os.environ.get("ATMASK_TEST_WHEELHOUSE"):
        cmd += ["--wheelhouse", os.environ["ATMASK_TEST_WHEELHOUSE"]]
    with open(log, "w") as out:  # the installed package, run in the checkout (no PYTHONPATH): as users do
        proc = subprocess.run(
            [*cmd, *(extra or [])], stdout=out, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT
        )
    return proc


def _image(target: str, base_image: str, tmp: Path) -> str:
    log = tmp / f"build-{target}.log"
    before = docker("image", "inspect", "-f", "{{.Id}}", IMAGES[target], check=False).stdout.strip()
    start = time.monotonic()
    proc = build_image(target, log)
    BUILD_SECONDS[target] = time.monotonic() - start
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise RuntimeError(f"atmask image build --target {target} failed: {proc.stderr.strip()}\n{tail}")
    after = docker("image", "inspect", "-f", "{{.Id}}", IMAGES[target]).stdout.strip()
    if before and before != after:  # the previous build, now untagged: gigabytes per session otherwise
        docker("rmi", before, check=False)
    return IMAGES[target]


@pytest.fixture(scope="session")
def atmask_image(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return _image("atmask", base_image, tmp_path_factory.mktemp("build"))


@pytest.fixture(scope="session")
def mlflow_image(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return _image("mlflow", base_image, tmp_path_factory.mktemp("build"))


def pod_dir(prefix: str) -> Path:
    """A host folder the pod user (uid 10001) can write, as a volume with fsGroup would be."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    if os.geteuid() == 0:
        os.chown(path, 10001, 10001)
    else:
        path.chmod(0o777)
    return path


# ------------------------------------------------------------------ PostgreSQL


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str

    def uri(self, database: str) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def psql(self, database: str, sql: str) -> str:
        cmd = ["psql", "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", database, "-tAc", sql]
        env = {**os.environ, "PGPASSWORD": self.password}
        return subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip()


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "postgresql"], check=True, env=env, capture_output=True
        )
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql) and cannot be installed here")
    return found[-1].parent


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (Debian's package; postgres refuses to run as root, so as
    root the cluster belongs to the 'postgres' user), with databases mlflow and mlflow_auth."""
    from fixtures_services import free_port

    bin_dir = _pg_bin()
    root = Path(tempfile.mkdtemp(prefix="atmask-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    db = Postgres("127.0.0.1", free_port(), "mlflow", "pg-" + os.urandom(6).hex())
    (root / "pw").write_text(db.password)
    if as_user:
        shutil.chown(root / "pw", "postgres", "postgres")
    data = root / "data"

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)

    run(
        str(bin_dir / "initdb"),
        "-D",
        str(data),
        "-U",
        db.user,
        f"--pwfile={root / 'pw'}",
        "-A",
        "scram-sha-256",
    )
    options = f"-h {db.host} -p {db.port} -k {root}"
    run(
        str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "start"
    )
    try:
        for name in ("mlflow", "mlflow_auth"):
            db.psql("postgres", f"CREATE DATABASE {name}")
        yield db
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
