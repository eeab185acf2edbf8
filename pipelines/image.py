"""``atmask image build|push``: the project's images, built with BuildKit and tagged with the git commit.

Two targets of the one Dockerfile: ``atmask`` (every pipeline step) and ``mlflow`` (the tracking server of
k8s/base/mlflow.yaml). ``build`` runs the ``docker`` CLI with BuildKit (``RUN --mount`` cache, secret and
wheelhouse mounts need it; the Docker SDK only drives the classic builder): a client with the buildx plugin
(``docker buildx build --load``), or a 20.10 client such as Debian's docker.io with ``DOCKER_BUILDKIT=1``.
For ``atmask`` it then recompiles the pipeline to run in the new tag; ``push`` pushes with the Docker SDK and
pins the pushed digest (``REPOSITORY@sha256:...``) in the compiled pipeline and the k8s overlays.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from components.errors import UserError
from components.io import write_text_atomic
from pipelines.names import DEFAULT_REPOSITORY, compiled_pipeline, project_root

TARGETS = {"atmask": DEFAULT_REPOSITORY, "mlflow": "ghcr.io/atmask-rcnn/atmask-mlflow"}
WHEELHOUSE = "wheelhouse"  # the build context's optional offline wheels (git-ignored)
CLI_ENV = "ATMASK_DOCKER_CLI"  # a docker client to use instead of the first suitable one
SYSTEM_DOCKER = "/usr/bin/docker"  # Debian's docker.io client (20.10: BuildKit without buildx)
# a Docker repository reference: [host[:port]/]path (lower case), no tag or digest
_REPOSITORY = re.compile(
    r"^([a-z0-9.-]+(:[0-9]+)?/)?[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*$"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{build,push}")
    for name, text in (("build", "build an image, tag it with the git commit"), ("push", "push it")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--target", choices=sorted(TARGETS), default="atmask", help="image (default atmask)")
        p.add_argument("--repository", help=f"default: {TARGETS['atmask']} / {TARGETS['mlflow']}")
        p.add_argument("--tag", help="image tag (default: the git commit, '-dirty' if the tree has changes)")
        p.add_argument(
            "--pipeline", type=Path, help="compiled pipeline to update (default: the committed one)"
        )
        p.add_argument("--params", type=Path, default=Path("params.yaml"), help="pipeline parameter defaults")
        p.add_argument(
            "--gpus",
            type=int,
            default=None,
            help="default GPUs per node when recompiling (default: params.yaml cluster.gpus_per_node)",
        )
        p.add_argument("--no-compile", action="store_true", help="leave the compiled pipeline as it is")
        p.add_argument(
            "--context",
            type=Path,
            help="the project checkout (build context; default: the one holding the working directory)",
        )
        if name == "build":
            add_build_arguments(p)


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-image", help="Python 3.11 bookworm base (default: the Dockerfile's, by digest)")
    p.add_argument("--torch-index-url", help="torch wheel index (default: PyTorch's CUDA 13.0 index)")
    p.add_argument(
        "--ca-file", type=Path, help="CA bundle pip trusts during the build (TLS-inspecting proxy)"
    )
    p.add_argument("--wheelhouse", type=Path, help="offline build: install only the wheels in this folder")


def run(args: argparse.Namespace) -> int:
    if args.gpus is not None and args.gpus < 1:
        raise UserError(f"--gpus: must be >= 1, got {args.gpus}")
    context = build_context(args.context)
    ref = image_ref(args.repository or TARGETS[args.target], args.tag or git_tag(context))
    client = docker_client()
    if args.action == "build":
        build(client, ref, context, build_options(args, client, context))
        final = ref
    else:
        final = push(client, ref)
    if args.target == "atmask" and not args.no_compile:
        out = use_image(final, args.pipeline or compiled_pipeline(context), args.params, args.gpus)
        print(f"{out}: components now run in {final}")
    if "@" in final:
        for overlay in pin_overlays(final, context / "k8s" / "overlays", TARGETS[args.target]):
            print(f"{overlay}: workloads now run in {final}")
    return 0


def build_context(given: Path | None) -> Path:
    """The checkout the images are built from (its Dockerfile, k8s overlays and compiled pipeline)."""
    root = project_root(given)
    if root is None:
        where = f"--context {given}" if given else f"the working directory {Path.cwd()}"
        raise UserError(
            f"{where}: not a checkout of the project (no Dockerfile, dvc.yaml and pipelines/ there); "
            "run 'atmask image' inside the repository or pass --context with its path"
        )
    return root


def image_ref(repository: str, tag: str) -> str:
    if not _REPOSITORY.match(repository):
        raise UserError(f"--repository {repository!r}: not a Docker repository (e.g. ghcr.io/org/atmask)")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tag):
        raise UserError(f"--tag {tag!r}: a tag is 1-128 letters, digits, '_', '.', '-'")
    return f"{repository}:{tag}"


def git_tag(root: Path) -> str:
    """Short commit of ``root``'s HEAD, with '-dirty' when tracked files have uncommitted changes."""
    try:
        commit = _git(root, "rev-parse", "--short=12", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        raise UserError(f"{root}: not a git checkout with a commit; pass --tag") from None
    return commit + ("-dirty" if dirty else "")


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def docker_client() -> Any:
    import docker

    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except docker.errors.DockerException as err:
        raise UserError(
            f"cannot reach the Docker engine ({_first_line(err)}); start Docker or set DOCKER_HOST"
        ) from None
    return client


# ------------------------------------------------------------------ build


def build_options(args: argparse.Namespace, client: Any, context: Path) -> list[str]:
    """``docker build`` options for the target, the build arguments and the secret; inputs checked first."""
    options = ["--target", args.target]
    if args.base_image:
        ensure_base_image(client, args.base_image)
        options += ["--build-arg", f"BASE_IMAGE={args.base_image}"]
    else:
        ensure_base_image(client, dockerfile_default("BASE_IMAGE", context / "Dockerfile"))
    if args.torch_index_url:
        if not re.match(r"^(https?|file)://\S+$", args.torch_index_url):
            raise UserError(
                f"--torch-index-url {args.torch_index_url!r}: expected an http(s):// or file:// index URL"
            )
        options += ["--build-arg", f"TORCH_INDEX_URL={args.torch_index_url}"]
    if args.ca_file:
        options += ["--secret", f"id=ca,src={check_ca_file(args.ca_file)}"]
    wheelhouse = context / WHEELHOUSE
    if args.wheelhouse:
        fill_wheelhouse(args.wheelhouse, wheelhouse)
    elif any(wheelhouse.glob("*.whl")):
        print(f"note: {wheelhouse} holds wheels, so pip installs from them only (offline build)")
    return options


def dockerfile_default(name: str, dockerfile: Path) -> str:
    found = re.search(rf"^ARG {name}=(\S+)$", dockerfile.read_text(encoding="utf-8"), re.MULTILINE)
    if not found:
        raise UserError(f"{dockerfile}: no 'ARG {name}=' default; pass it explicitly")
    return found.group(1)


def ensure_base_image(client: Any, base: str) -> None:
    """The base must be in the engine's store or pullable; BuildKit would otherwise fail deep in the build."""
    import docker

    try:
        client.images.get(base)
        return
    except docker.errors.ImageNotFound:
        pass
    except docker.errors.APIError as err:
        raise UserError(f"base image {base}: the engine refused ({_first_line(err)})") from None
    try:
        client.images.pull(base)
    except docker.errors.DockerException as err:
        raise UserError(
            f"base image {base}: not in the engine and pulling it failed ({_first_line(err)}); make a local "
            "one from Debian's packages with 'bash .ci/docker.sh base' and pass --base-image atmask-base:bookworm"
        ) from None


def check_ca_file(path: Path) -> Path:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise UserError(f"--ca-file {path}: cannot read it ({err.strerror})") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise UserError(
            f"--ca-file {path}: no PEM certificate in it (e.g. /etc/ssl/certs/ca-certificates.crt)"
        )
    return path.resolve()


def fill_wheelhouse(source: Path, dest: Path) -> None:
    """Make ``dest`` (inside the build context) hold exactly ``source``'s wheels: hard links, else copies."""
    wheels = sorted(source.glob("*.whl")) if source.is_dir() else []
    if not wheels:
        raise UserError(f"--wheelhouse {source}: no *.whl files there (fill it with 'pip wheel --wheel-dir')")
    if source.resolve() == dest.resolve():
        return
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for wheel in wheels:
        try:
            os.link(wheel, tmp / wheel.name)
        except OSError:
            shutil.copy2(wheel, tmp / wheel.name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    print(f"{dest}: {len(wheels)} wheels from {source} (offline build)")


def buildkit_cli() -> tuple[list[str], dict[str, str]]:
    """The ``docker`` command that builds with BuildKit here, and its environment.

    $ATMASK_DOCKER_CLI, else the ``docker`` on PATH, else Debian's /usr/bin/docker: the first with the
    buildx plugin, or older than 23.0 (those build with BuildKit themselves when DOCKER_BUILDKIT=1)."""
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    candidates = [os.environ.get(CLI_ENV), shutil.which("docker"), SYSTEM_DOCKER]
    for cli in dict.fromkeys(c for c in candidates if c and os.access(c, os.X_OK)):
        if _quiet([cli, "buildx", "version"], env):
            return [cli, "buildx", "build", "--load"], env
        version = re.search(r"version (\d+)\.", _quiet([cli, "--version"], env) or "")
        if version and int(version.group(1)) < 23:
            return [cli, "build"], env
    raise UserError(
        "no docker client here builds with BuildKit: install Debian's docker.io (its 20.10 client does) or "
        f"the buildx plugin, or set {CLI_ENV} to such a client"
    )


def _quiet(cmd: list[str], env: dict[str, str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def build(client: Any, ref: str, context: Path, options: list[str] | None = None) -> None:
    """BuildKit build of the checkout ``context``'s Dockerfile as ``ref``; its log streams to stdout."""
    cli, env = buildkit_cli()
    cmd = [*cli, "--progress", "plain", "--file", str(context / "Dockerfile"), *(options or [])]
    cmd += ["--tag", ref, str(context)]
    print(f"building {ref}: {' '.join(cmd[:2])} ... {' '.join(options or [])}", flush=True)
    start = time.monotonic()
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            tail = [*tail[-199:], line.rstrip("\n")]
    sys.stdout.flush()
    if proc.returncode != 0:
        raise UserError(failed_step(ref, tail))
    size = client.images.get(ref).attrs.get("Size", 0)
    print(f"built {ref} in {time.monotonic() - start:.0f} s ({size / 1e9:.2f} GB)")


def failed_step(ref: str, log: list[str]) -> str:
    """One line from the end of a failed BuildKit log: the step that failed and what to do."""
    steps = [m for line in log if (m := re.match(r"^ > \[([^\]]+)\] (.*?):?$", line))]
    code = next((m.group(1) for line in reversed(log) if (m := re.search(r"exit code: (\d+)", line))), None)
    if not steps:
        last = next((line for line in reversed(log) if line.strip()), "no output")
        return f"docker build of {ref} failed: {last.strip()[:300]}"
    stage, instruction = steps[-1].group(1), re.sub(r"--mount=\S+\s*", "", steps[-1].group(2))
    instruction = re.sub(r"\s+", " ", instruction).strip()
    hint = "its log is above"
    if "pip " in instruction:
        hint += "; behind a TLS-inspecting proxy pass --ca-file, without network pass --wheelhouse"
    status = f" (exit code {code})" if code else ""
    return f"docker build of {ref} failed at step [{stage}] {instruction[:120]}{status}; {hint}"


# ------------------------------------------------------------------ push


def push(client: Any, ref: str) -> str:
    """Push ``ref``; return ``repository@sha256:...`` as the registry reports it."""
    import docker

    repository, tag = ref.rsplit(":", 1)
    try:
        events = list(client.images.push(repository, tag=tag, stream=True, decode=True))
    except docker.errors.APIError as err:
        raise UserError(f"docker push {ref}: {_first_line(err)}") from None
    return pushed_digest(ref, events)


def pushed_digest(ref: str, events: list[dict[str, Any]]) -> str:
    errors = [e.get("error") or e.get("errorDetail", {}).get("message") for e in events]
    errors = [e for e in errors if e]
    if errors:
        raise UserError(f"docker push {ref}: {errors[0]} (log in with 'docker login' first?)")
    digests = [e["aux"]["Digest"] for e in events if isinstance(e.get("aux"), dict) and "Digest" in e["aux"]]
    if not digests:
        raise UserError(f"docker push {ref}: the registry reported no digest")
    return f"{ref.rsplit(':', 1)[0]}@{digests[-1]}"


def use_image(ref: str, pipeline: Path, params: Path = Path("params.yaml"), gpus: int | None = None) -> Path:
    from pipelines import pipeline as pl

    return pl.compile_pipeline(pipeline, ref, params, pl.GpuResources(gpus=gpus))


_IMAGES_BLOCK = re.compile(r"^images:\n(?:[ -].*\n)*", re.MULTILINE)


def pin_overlays(pinned: str, overlays: Path, name: str = DEFAULT_REPOSITORY) -> list[Path]:
    """Point the ``images:`` entry ``name`` of every kustomization under ``overlays`` that lists it (at any
    depth) at ``repository@sha256:...``; the other entries and the comments elsewhere are kept."""
    repository, digest = pinned.split("@", 1)
    changed = []
    for path in sorted(overlays.rglob("kustomization.yaml")):
        text = path.read_text(encoding="utf-8")
        found = _IMAGES_BLOCK.search(text)
        if not found:
            raise UserError(
                f"{path}: no top-level 'images:' list to pin; add one naming {DEFAULT_REPOSITORY}"
            )
        entries = yaml.safe_load(found.group(0))["images"] or []
        if not any(e.get("name") == name for e in entries):
            continue  # an overlay that runs no MLflow server
        entries = [
            {"name": name, "newName": repository, "digest": digest} if e["name"] == name else e
            for e in entries
        ]
        block = "images:\n" + "".join(
            "  - "
            + "\n    ".join(f"{k}: {e[k]}" for k in ("name", "newName", "newTag", "digest") if k in e)
            + "\n"
            for e in entries
        )
        new = text[: found.start()] + block + text[found.end() :]
        if new != text:
            write_text_atomic(path, new)
        changed.append(path)
    if not changed:
        raise UserError(f"{overlays}: no kustomization lists {name} under 'images:'; add it where it runs")
    return changed


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
