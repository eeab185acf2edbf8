"""Training checkpoints and the ``model.pt`` format.

``model.pt`` (format_version 1), loadable with ``torch.load(path, weights_only=True)``::

    {"model": state_dict, "config": ModelConfig.to_dict(), "ablation": name,
     "categories": [COCO category dicts; index i -> label i + 1], "format_version": 1}

Checkpoints live in ``runs/<name>/checkpoints/ckpt_<iteration>.pt``, each written atomically (temp file,
fsync, rename) with a ``.sha256`` sidecar written after it. A checkpoint whose sidecar is missing or does
not match, or that fails to load, is skipped with a warning and the previous one is used.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from components.errors import UserError
from components.io import atomic_path, write_text_atomic
from components.run_layout import CHECKPOINT_DIR, MODEL_FILE
from model.builder import build_model, load_file
from model.config import ConfigError, ModelConfig

MODEL_FORMAT_VERSION = 1
_CKPT_RE = re.compile(r"^ckpt_(\d+)\.pt$")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _save_atomic(obj: Any, path: Path) -> None:
    """Write ``path`` and then its sidecar. On a full disk neither is left (UserError, one line); older
    checkpoints are untouched, so a rerun resumes from the newest one that verifies."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        try:
            torch.save(obj, fh)
        except RuntimeError as err:  # torch reports a failed write as "unexpected pos": raise the cause
            cause = _os_error_in(err)
            if cause is None:
                raise
            raise cause from None
        fh.flush()
        os.fsync(fh.fileno())
    try:
        write_text_atomic(path.with_name(path.name + ".sha256"), f"{sha256_file(path)}  {path.name}\n")
    except UserError:
        path.unlink(missing_ok=True)  # unverifiable without its sidecar: drop it, keep the older ones
        raise


def _os_error_in(err: BaseException) -> OSError | None:
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


# ---------------------------------------------------------------- model.pt


def save_model(
    path: str | Path, model: nn.Module, config: ModelConfig, categories: list[dict[str, Any]]
) -> None:
    """Write ``model.pt`` atomically (with a ``.sha256`` sidecar)."""
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    payload = {
        "model": state,
        "config": config.to_dict(),
        "ablation": config.ablation,
        "categories": [dict(c) for c in categories],
        "format_version": MODEL_FORMAT_VERSION,
    }
    _save_atomic(payload, Path(path))


def load_trained_model(
    path_or_run_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelConfig, list[dict[str, Any]]]:
    """``(model in eval mode, its ModelConfig, categories)`` from a ``model.pt`` or a run directory."""
    path = Path(path_or_run_dir)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise UserError(f"{path}: no trained model here; run 'atmask train' first or give the model.pt path")
    try:
        payload = load_file(path, key="model.pt")
    except ConfigError as err:
        raise UserError(f"{err}; re-run training to rewrite it") from None
    if not isinstance(payload, dict) or payload.get("format_version") != MODEL_FORMAT_VERSION:
        version = payload.get("format_version") if isinstance(payload, dict) else None
        raise UserError(
            f"{path}: unsupported model.pt format_version {version!r}; expected {MODEL_FORMAT_VERSION}"
        )
    try:
        config = ModelConfig.from_dict(payload["config"])
        # The weights are in the file: do not read the initialisation files named in the config.
        init_free = ModelConfig.from_dict({**payload["config"], "weights": None, "backbone_weights": None})
        model = build_model(init_free)
        model.load_state_dict(payload["model"])
    except (ConfigError, KeyError, RuntimeError) as err:
        raise UserError(f"{path}: does not match its stored config ({err})") from None
    return model.to(device).eval(), config, list(payload.get("categories", []))


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


# ---------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop touches, as tensors and plain values (``weights_only``-safe)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _to_plain(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _to_plain(value: Any) -> Any:
    return [_to_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuple(value: Any) -> Any:
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value


# ---------------------------------------------------------------- periodic checkpoints


def checkpoint_path(run_dir: Path, iteration: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"ckpt_{iteration:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, newest first."""
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(run_dir: Path, iteration: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``ckpt_<iteration>.pt`` atomically, then drop all but the newest ``keep`` (at least 2)."""
    path = checkpoint_path(run_dir, iteration)
    _save_atomic({**state, "iteration": iteration}, path)
    for old in list_checkpoints(run_dir)[max(keep, 2) :]:
        _remove(old)
    return path


def remove_checkpoints(run_dir: Path) -> None:
    """Forget a run's checkpoints (``--no-resume``): the next run starts over."""
    for old in list_checkpoints(run_dir):
        _remove(old)


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".sha256").unlink(missing_ok=True)


def _verify(path: Path) -> str | None:
    """None if ``path`` matches its sidecar, else why not."""
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        return "no .sha256 sidecar (the write was interrupted)"
    expected = sidecar.read_text(encoding="utf-8").split()[0] if sidecar.stat().st_size else ""
    actual = sha256_file(path)
    return None if actual == expected else f"sha256 {actual[:12]}... does not match the sidecar"


def load_latest_checkpoint(run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that verifies and loads, or None; bad ones are reported and skipped."""
    for path in list_checkpoints(run_dir):
        problem = _verify(path)
        if problem is None:
            try:
                return torch.load(path, map_location="cpu", weights_only=True), path
            except Exception as err:
                problem = f"cannot be loaded ({type(err).__name__}: {err})"
        print(f"atmask train: warning: skipping checkpoint {path}: {problem}", file=sys.stderr)
    return None
