"""``atmask image build|push``: the project image with the Docker SDK, tagged with the git commit.

``build`` builds the Dockerfile at the repository root as ``REPOSITORY:<commit>`` and recompiles the
pipeline to run in that tag; ``push`` pushes it and recompiles the pipeline with the pushed digest
(``REPOSITORY@sha256:...``), so the committed pipeline names an immutable image.
"""

import argparse
import re
import subprocess
from pathlib import Path
from typing import Any

from components.errors import UserError
from components.io import write_text_atomic
from pipelines.names import COMPILED, DEFAULT_REPOSITORY

REPO_ROOT = Path(__file__).resolve().parents[1]
# a Docker repository reference: [host[:port]/]path (lower case), no tag or digest
_REPOSITORY = re.compile(
    r"^([a-z0-9.-]+(:[0-9]+)?/)?[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*$"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{build,push}")
    for name, text in (("build", "build the image, tag it with the git commit"), ("push", "push it")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--repository", default=DEFAULT_REPOSITORY, help=f"default: {DEFAULT_REPOSITORY}")
        p.add_argument("--tag", help="image tag (default: the git commit, '-dirty' if the tree has changes)")
        p.add_argument(
            "--pipeline", type=Path, help="compiled pipeline to update (default: the committed one)"
        )
        p.add_argument("--params", type=Path, default=Path("params.yaml"), help="pipeline parameter defaults")
        p.add_argument(
            "--gpus", type=int, default=1, help="GPUs per training pod when recompiling (default 1)"
        )
        p.add_argument("--no-compile", action="store_true", help="leave the compiled pipeline as it is")


def run(args: argparse.Namespace) -> int:
    if args.gpus < 1:
        raise UserError(f"--gpus: must be >= 1, got {args.gpus}")
    ref = image_ref(args.repository, args.tag or git_tag(REPO_ROOT))
    client = docker_client()
    if args.action == "build":
        build(client, ref)
        final = ref
    else:
        final = push(client, ref)
    if not args.no_compile:
        out = use_image(final, args.pipeline, args.params, args.gpus)
        print(f"{out}: components now run in {final}")
    if "@" in final:
        for overlay in pin_overlays(final, REPO_ROOT / "k8s" / "overlays"):
            print(f"{overlay}: workloads now run in {final}")
    return 0


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


def build(client: Any, ref: str) -> None:
    import docker

    print(f"building {ref} from {REPO_ROOT / 'Dockerfile'}")
    try:
        _, logs = client.images.build(path=str(REPO_ROOT), tag=ref, rm=True, pull=True)
    except docker.errors.BuildError as err:
        raise UserError(f"docker build of {ref} failed: {_first_line(err)}") from None
    except docker.errors.APIError as err:
        raise UserError(f"docker build of {ref}: the engine refused ({_first_line(err)})") from None
    for entry in logs:
        if "stream" in entry:
            print(entry["stream"], end="")


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


def use_image(
    ref: str, pipeline: Path | None = None, params: Path = Path("params.yaml"), gpus: int = 1
) -> Path:
    from pipelines import pipeline as pl

    return pl.compile_pipeline(pipeline or COMPILED, ref, params, pl.GpuResources(gpus=gpus))


_IMAGES_BLOCK = re.compile(r"^images:\n(?:[ -].*\n)*", re.MULTILINE)


def pin_overlays(pinned: str, overlays: Path) -> list[Path]:
    """Point the ``images:`` entry of every kustomization under ``overlays`` (at any depth: the
    infrastructure overlays and their ``training/`` overlays) at ``repository@sha256:...`` (comments
    elsewhere kept)."""
    repository, digest = pinned.split("@", 1)
    block = f"images:\n  - name: {DEFAULT_REPOSITORY}\n    newName: {repository}\n    digest: {digest}\n"
    changed = []
    for path in sorted(overlays.rglob("kustomization.yaml")):
        text = path.read_text(encoding="utf-8")
        new, count = _IMAGES_BLOCK.subn(block, text, count=1)
        if count != 1:
            raise UserError(
                f"{path}: no top-level 'images:' list to pin; add one naming {DEFAULT_REPOSITORY}"
            )
        if new != text:
            write_text_atomic(path, new)
        changed.append(path)
    return changed


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
