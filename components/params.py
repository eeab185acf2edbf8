"""params.yaml -> typed objects, validated once at the edge (DESIGN.md §6).

Every section is a frozen dataclass. Unknown keys, wrong types and out-of-range values raise
``UserError`` naming the file and the dotted key, e.g. ``params.yaml: recipes.cpu_demo.lr: must be > 0``.

Ablations: the paper's named configurations live in one place, ``model.config.ABLATIONS``. An entry under
``ablations:`` for one of those names states only its differences (``thr: {k: 2.0}``); a new name either
starts from one of them (``base: atmask``, then the differences, as Detectron2's ``_BASE_``) or spells out
every switch, so that a typo'd name is an error rather than a silent extra run.

Model: ``model:`` holds the shared keys (the paper's R50-FPN settings); a recipe's ``model:`` overrides
them (the CPU demo's small backbone and images live in ``recipes.cpu_demo.model``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from components.errors import UserError
from model.config import ABLATIONS, ConfigError, HeadConfig, ModelConfig, check_choice, check_positive

DEFAULT_PARAMS = Path("params.yaml")
CHECK_MODES = ("full", "header")  # ingest's image checks: decode every image | read the header only
SYNTHETIC_SHAPES = 6  # shape categories the synthetic generator draws (components.synthetic.SHAPES)


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and seed of the embedded dataset (params.yaml ``data.synthetic``)."""

    seed: int = field(default=0, metadata={"range": (0, 2**32 - 1)})
    train_images: int = field(default=64, metadata={"range": (1, 10**7)})
    val_images: int = field(default=16, metadata={"range": (1, 10**7)})
    image_size: int = field(default=128, metadata={"range": (32, 4096)})
    num_categories: int = field(default=3, metadata={"range": (1, SYNTHETIC_SHAPES)})
    max_instances: int = field(default=4, metadata={"range": (1, 50)})

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            key, (low, high) = f.name, f.metadata["range"]
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"data.synthetic.{key}: expected an integer, got {value!r}")
            if not low <= value <= high:
                raise UserError(f"data.synthetic.{key}: {value} is out of range; use {low}..{high}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SyntheticConfig:
        """Build from the ``data.synthetic`` mapping of params.yaml; unknown keys are an error."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise UserError(
                    f"data.synthetic.{key}: unknown key in params; allowed keys: {', '.join(sorted(known))}"
                )
        return cls(**data)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DataParams:
    """``atmask ingest`` defaults (its flags override them)."""

    source: str = "synthetic"  # synthetic | local dir | s3://bucket/prefix | https://... | coco2017
    out: str = "data/coco"
    strict: bool = False
    s3_endpoint_url: str | None = None
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    workers: int | None = None  # parallel image checks/downloads (None: one per CPU, at most 32)
    image_check: str = "full"  # full: decode every image | header: sizes only
    cache_dir: str | None = (
        None  # HTTP downloads kept for resume (None: $ATMASK_CACHE_DIR or ~/.cache/atmask)
    )
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # the largest image accepted by ingest, predict and the served model (components.images.ImageLimits)
    max_image_pixels: int = 89_478_485  # Pillow's own decompression-bomb threshold
    max_image_side: int = 16_384
    max_image_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        for key in ("max_image_pixels", "max_image_side", "max_image_bytes"):
            check_positive(key, getattr(self, key))
        if not self.splits:
            raise ConfigError("splits: give at least one split, e.g. [train, val]")
        check_choice("image_check", self.image_check, CHECK_MODES)
        if self.workers is not None:
            check_positive("workers", self.workers)


@dataclass(frozen=True)
class TrainParams:
    """One training recipe (SGD, warm-up, multi-step decay), paper §4."""

    optimizer: str = "sgd"  # sgd (momentum, the paper's) | adamw
    lr: float = 0.02
    batch_size: int = 4  # global batch (all processes together)
    base_batch_size: int = 4  # batch that ``lr`` is tuned for; linear scaling rule applies otherwise
    iterations: int = 300
    warmup_iters: int = 50
    warmup_factor: float = 0.001
    lr_steps: list[int] = field(default_factory=lambda: [200, 260])
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    amp: str = (
        "auto"  # auto (bf16 where supported on GPU, else fp16 + scaler; off on CPU) | bf16 | fp16 | off
    )
    grad_clip: float | None = None
    hflip_prob: float = 0.5
    workers: int = 2
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    deterministic: bool = False
    sync_bn: bool = False
    on_nonfinite: str = "stop"  # stop | skip
    model: dict[str, Any] = field(default_factory=dict)  # model keys this recipe overrides

    def __post_init__(self) -> None:
        check_positive("lr", self.lr)
        for key in ("batch_size", "base_batch_size", "iterations", "checkpoint_every", "log_every"):
            check_positive(key, getattr(self, key))
        for key in ("warmup_iters", "workers", "keep_checkpoints", "momentum", "weight_decay", "lr_gamma"):
            check_positive(key, getattr(self, key), allow_zero=True)
        if not 0 <= self.hflip_prob <= 1:
            raise ConfigError(f"hflip_prob: must be within [0, 1], got {self.hflip_prob!r}")
        check_choice("optimizer", self.optimizer, ("sgd", "adamw"))
        check_choice("amp", self.amp, ("auto", "bf16", "fp16", "off"))
        check_choice("on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        if self.grad_clip is not None:
            check_positive("grad_clip", self.grad_clip)
        if list(self.lr_steps) != sorted(self.lr_steps) or any(s <= 0 for s in self.lr_steps):
            raise ConfigError(f"lr_steps: must be increasing positive iterations, got {self.lr_steps!r}")


@dataclass(frozen=True)
class EvaluateParams:
    split: str = "val"
    fixed_thresholds: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    boundary_dilation_ratio: float = 0.02
    num_samples: int = 4  # validation images drawn as pictures
    batch_size: int = 4
    evaluator: str = "faster"  # faster (faster-coco-eval, proven equal to pycocotools) | pycocotools

    def __post_init__(self) -> None:
        check_choice("evaluator", self.evaluator, ("faster", "pycocotools"))
        if any(not 0 < t < 1 for t in self.fixed_thresholds):
            raise ConfigError(f"fixed_thresholds: each must be within (0, 1), got {self.fixed_thresholds!r}")
        check_positive("boundary_dilation_ratio", self.boundary_dilation_ratio)
        check_positive("batch_size", self.batch_size)


@dataclass(frozen=True)
class RegisterParams:
    model_name: str = "atmask-rcnn"
    candidate: str = "best"  # an ablation name, or "best" (highest segm AP among the runs)
    metric: str = "segm/AP"
    min_improvement: float = 0.0  # margin over the champion and over this pipeline run's baseline


@dataclass(frozen=True)
class MlflowParams:
    experiment: str = "atmask-ablations"
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db


@dataclass(frozen=True)
class ClusterParams:
    """The cluster profile: defaults of the Kubeflow pipeline (the local profile is ``train.recipe``)."""

    recipe: str | None = None  # a recipe under ``recipes:`` sized for GPUs (None: train.recipe)
    gpus_per_node: int = 4  # the paper's 4 GPUs; torchrun inside the pod
    nodes: int = 1  # > 1: a Kubeflow Trainer TrainJob launched by the pipeline's train task

    def __post_init__(self) -> None:
        check_positive("gpus_per_node", self.gpus_per_node)
        check_positive("nodes", self.nodes)


@dataclass(frozen=True)
class Params:
    data: DataParams
    model: dict[str, Any]
    ablations: dict[str, HeadConfig]
    recipe: str
    recipes: dict[str, TrainParams]
    seeds: list[int]
    evaluate: EvaluateParams
    register: RegisterParams
    mlflow: MlflowParams
    cluster: ClusterParams = field(default_factory=ClusterParams)
    source: Path = DEFAULT_PARAMS

    @property
    def train(self) -> TrainParams:
        return self.recipes[self.recipe]

    def model_config(self, ablation: str, num_classes: int) -> ModelConfig:
        """The model for one ablation: ``model`` keys, then the recipe's, then the ablation's head."""
        if ablation not in self.ablations:
            raise UserError(
                f"{self.source}: ablation {ablation!r} is not defined under 'ablations'; "
                f"defined: {', '.join(self.ablations)}"
            )
        keys = {**self.model, **self.train.model, "num_classes": num_classes}
        for name in ("anchor_sizes", "frozen"):
            if name in keys:
                keys[name] = tuple(keys[name])
        try:
            return ModelConfig(ablation=ablation, head=self.ablations[ablation], **keys)
        except (ConfigError, TypeError) as err:
            raise UserError(f"{self.source}: {err}") from None


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: Mapping[str, Any] | None = None) -> Params:
    """Read and validate params.yaml; ``overrides`` maps dotted keys to values (``train.recipe`` etc.)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UserError(
            f"{path}: params file not found; pass --params with the path to params.yaml"
        ) from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({err}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level")
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    try:
        return _parse(raw, path)
    except ConfigError as err:
        raise UserError(f"{path}: {err}") from None


def _parse(raw: dict[str, Any], path: Path) -> Params:
    known = {"data", "model", "ablations", "train", "recipes", "evaluate", "register", "mlflow", "cluster"}
    _reject_unknown(raw, known, "")
    model = dict(raw.get("model") or {})
    _reject_unknown(model, {f.name for f in dataclasses.fields(ModelConfig)} - {"ablation", "head"}, "model.")
    ablations = {name: ablation_head(name, spec) for name, spec in (raw.get("ablations") or {}).items()}
    if not ablations:
        raise ConfigError("ablations: define at least one ablation (e.g. baseline, atmask)")
    recipes = {
        name: _build(TrainParams, spec or {}, f"recipes.{name}.")
        for name, spec in (raw.get("recipes") or {}).items()
    }
    train = dict(raw.get("train") or {})
    _reject_unknown(train, {"recipe", "seeds"}, "train.")
    seeds = _seeds(train.get("seeds", [0]))
    recipe = train.get("recipe", "cpu_demo")
    if recipe not in recipes:
        raise ConfigError(
            f"train.recipe: {recipe!r} is not defined under 'recipes'; defined: {', '.join(recipes)}"
        )
    for name, spec in recipes.items():
        _reject_unknown(
            spec.model,
            set(model) | {f.name for f in dataclasses.fields(ModelConfig)},
            f"recipes.{name}.model.",
        )
    params = Params(
        data=_build(DataParams, raw.get("data") or {}, "data."),
        model=model,
        ablations=ablations,
        recipe=recipe,
        recipes=recipes,
        seeds=seeds,
        evaluate=_build(EvaluateParams, raw.get("evaluate") or {}, "evaluate."),
        register=_build(RegisterParams, raw.get("register") or {}, "register."),
        mlflow=_build(MlflowParams, raw.get("mlflow") or {}, "mlflow."),
        cluster=_build(ClusterParams, raw.get("cluster") or {}, "cluster."),
        source=path,
    )
    if params.cluster.recipe is not None and params.cluster.recipe not in recipes:
        raise ConfigError(
            f"cluster.recipe: {params.cluster.recipe!r} is not defined under 'recipes'; "
            f"defined: {', '.join(recipes)}"
        )
    params.model_config(next(iter(ablations)), num_classes=2)  # the shared model keys are valid
    return params


# A new ablation without a ``base`` spells these out, so that a typo'd name (``-S ablations.atmsk.k=1``)
# is an error rather than a silent extra run with default switches.
NEW_ABLATION_KEYS = ("threshold_branch", "p2t_fusion", "t2p_fusion", "rt_source", "k")


def ablation_head(name: str, spec: Any) -> HeadConfig:
    """The head of ``ablations.<name>``: a paper configuration plus the entry's differences."""
    prefix = f"ablations.{name}."
    spec = dict(spec or {})
    _reject_unknown(spec, {f.name for f in dataclasses.fields(HeadConfig)} | {"base"}, prefix)
    base = spec.pop("base", name if name in ABLATIONS else None)
    if base is None:
        needed = NEW_ABLATION_KEYS if spec.get("threshold_branch", True) else NEW_ABLATION_KEYS[:1]
        missing = [key for key in needed if key not in spec]
        if missing:
            raise ConfigError(
                f"ablations.{name}: unknown ablation; the paper's are {', '.join(ABLATIONS)}. Start from one "
                f"of them (base: atmask, then what differs) or set {', '.join(needed)} (missing: "
                f"{', '.join(missing)}); check the name for a typo"
            )
        return _build(HeadConfig, spec, prefix)
    if base not in ABLATIONS:
        raise ConfigError(
            f"{prefix}base: {base!r} is not one of the paper's ablations ({', '.join(ABLATIONS)})"
        )
    hints = typing.get_type_hints(HeadConfig)
    changes = {key: _coerce(value, hints[key], f"{prefix}{key}") for key, value in spec.items()}
    try:
        return dataclasses.replace(ABLATIONS[base], **changes)
    except ConfigError as err:
        raise ConfigError(f"ablations.{name}: {err}") from None


def _seeds(value: Any) -> list[int]:
    """``train.seeds``: the experiment's seed axis, distinct non-negative integers."""
    seeds = _coerce(value, list[int], "train.seeds")
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"train.seeds: give distinct non-negative integers, e.g. [0, 1, 2]; got {value!r}")
    return seeds


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """``raw["a"]["b"]["c"] = value`` for ``"a.b.c"``, creating missing sections."""
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {dotted}: {part} is not a section")
    node[leaf] = value


def _reject_unknown(values: Mapping[str, Any], known: set[str], prefix: str) -> None:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'top level'}: expected a mapping, got {values!r}")
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; allowed keys are {', '.join(sorted(known))}")


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    """Instantiate a dataclass from a mapping, checking keys and value types against its annotations."""
    hints = {f.name: typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}
    _reject_unknown(values, set(hints), prefix)
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        message = str(err)
        if not message.startswith(prefix.split(".")[0]):
            message = f"{prefix}{message}"
        raise ConfigError(message) from None


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_describe(hint)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict or hint is Any:
        if origin is dict and not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{key}: expected {_describe(hint)}, got {value!r}")
    return value


def _describe(hint: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    args = typing.get_args(hint)
    if args:
        return " or ".join(names.get(a, getattr(a, "__name__", str(a))) for a in args)
    return names.get(hint, getattr(hint, "__name__", str(hint)))
