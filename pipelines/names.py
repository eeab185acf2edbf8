"""Names the pipeline's modules share (kept free of KFP imports, so the CLI stays fast to start)."""

from pathlib import Path

PIPELINE_NAME = "atmask-ablation"
COMPILED = Path(__file__).with_name("atmask_pipeline.yaml")  # committed; tests fail when it is stale
DEFAULT_REPOSITORY = "ghcr.io/atmask-rcnn/atmask"
DEFAULT_IMAGE = f"{DEFAULT_REPOSITORY}:0.1.0"
