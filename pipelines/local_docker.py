"""``atmask pipeline run-local --runner docker``: kfp.local's DockerRunner set up to run each component the
way its pod runs on Kubernetes, in the project image, against a tracking server the containers can reach.

kfp.local.DockerRunner (kfp 2.17) passes the component's ``command + args`` as the container's CMD, so the
image's ENTRYPOINT (``atmask``) would prefix it: cleared here, as a pod's ``command`` replaces it. It
bind-mounts the pipeline root at its host path and runs as the image's user, which must be able to write
there (Kubernetes: the pod's fsGroup); environment variables come from the runner, not from the cluster
Secrets the compiled pipeline names.
"""

import os
from pathlib import Path
from typing import Any

from components.errors import UserError
from pipelines.runtime import RUN_ID_ENV

# what the cluster's Secrets give the pods (pipelines.pipeline.use_secrets), passed on from this environment
DOCKER_ENV = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    RUN_ID_ENV,  # a pod's run-id label on the cluster
)
POD_USER = "10001:10001"  # the image's user, the pods' runAsUser/runAsGroup (k8s/)


def docker_runner(image: str, volumes: list[Path], read_only: list[Path] | None = None) -> Any:
    """``kfp.local.DockerRunner`` running each component as its pod runs on Kubernetes: the component's
    command replaces the image's ENTRYPOINT (kfp.local appends it otherwise), read-only root with a tmpfs
    /tmp, no capabilities, no privilege escalation, a non-root user; host network, so the tasks reach the
    tracking server. ``volumes`` are mounted at the same paths and made the pod
    user's (as the pods' fsGroup does), or the tasks run as this user when it is not root; ``read_only``
    folders (a folder DVC remote) are mounted read-only and left as they are. The caller checks
    the image and the tracking server's URL first (:func:`check_inputs`)."""
    import docker
    from kfp import local

    user = POD_USER
    for path in volumes:
        path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        for path in volumes:
            os.chown(path, *map(int, POD_USER.split(":")))
    else:
        user = f"{os.getuid()}:{os.getgid()}"
    return local.DockerRunner(
        entrypoint=[],
        user=user,
        read_only=True,
        tmpfs={"/tmp": "rw,exec,nosuid,nodev"},
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        network_mode="host",
        environment={k: os.environ[k] for k in DOCKER_ENV if k in os.environ},
        mounts=[docker.types.Mount(str(p), str(p), type="bind") for p in volumes[1:]]
        + [docker.types.Mount(str(p), str(p), type="bind", read_only=True) for p in read_only or []],
    )


def check_inputs(image: str, tracking_uri: str) -> None:
    """What --runner docker needs, checked before anything is read or made: a tracking server URL the
    containers reach, and the image in the local engine."""
    import docker

    from pipelines.image import docker_client

    if not tracking_uri.startswith(("http://", "https://")):
        raise UserError(
            f"--mlflow-tracking-uri {tracking_uri or '(none)'}: --runner docker needs a tracking server "
            "(http://host:port) that the containers reach; start one with 'mlflow server'"
        )
    try:
        docker_client().images.get(image)
    except docker.errors.ImageNotFound:
        raise UserError(
            f"--image {image}: not in the local Docker engine; build it with 'atmask image build "
            "--repository REPO --tag TAG --no-compile' and pass --image REPO:TAG"
        ) from None
