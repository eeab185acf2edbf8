"""Names the pipeline's modules share (kept free of KFP imports, so the CLI stays fast to start)."""

from pathlib import Path

PIPELINE_NAME = "atmask-ablation"
COMPILED = Path(__file__).with_name("atmask_pipeline.yaml")  # committed; tests fail when it is stale
DEFAULT_REPOSITORY = "ghcr.io/atmask-rcnn/atmask"
DEFAULT_IMAGE = f"{DEFAULT_REPOSITORY}:0.1.0"
CHECKOUT_MARKERS = ("Dockerfile", "dvc.yaml", "pipelines")


def project_root(start: Path | None = None) -> Path | None:
    """The project checkout a command runs in: the nearest folder at or above ``start`` (default: the working
    directory) holding the Dockerfile, dvc.yaml and pipelines/; None outside one (an installed package is not
    a checkout, so the files a command writes belong to the checkout, never to site-packages)."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if all((folder / name).exists() for name in CHECKOUT_MARKERS):
            return folder
    return None


def compiled_pipeline(root: Path | None = None) -> Path:
    """The compiled pipeline of checkout ``root`` (default: the one holding the working directory), what
    ``compile`` and ``image build`` update; outside a checkout, the copy installed with the package."""
    root = root or project_root()
    return root / "pipelines" / COMPILED.name if root else COMPILED
