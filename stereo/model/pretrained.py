"""Starting points: load released backbone weights into the feature side, with an explicit key mapping.

`WeightMismatchError` is the one error for any weight file that does not fit a module; it lists every missing,
unexpected and wrong-shaped key by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from stereo.config.errors import ConfigError
from stereo.config.schema import PretrainedConfig
from stereo.model.backbone.feature import Feature


@dataclass(eq=False)
class WeightMismatchError(ValueError):
    """A weight file does not fit the module it is loaded into. Keys are named as the file has (or should have)
    them; `wrong_shape` holds (key, shape in the file, shape in the model)."""

    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # key, file, model

    def __post_init__(self) -> None:
        super().__init__(self.render())

    def render(self, limit: int = 20) -> str:
        def listed(items: list[str]) -> str:
            more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
            return ", ".join(items[:limit]) + more

        parts = [f"{self.source}: the weights do not fit the model"]
        if self.missing:
            parts.append(f"missing {len(self.missing)}: {listed(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)}: {listed(self.unexpected)}")
        if self.wrong_shape:
            shapes = [f"{k} (file {list(f)}, model {list(m)})" for k, f, m in self.wrong_shape]
            parts.append(f"wrong shape {len(shapes)}: {listed(shapes)}")
        return "; ".join(parts)

    def __str__(self) -> str:
        return self.render()


@dataclass
class LoadSummary:
    source: str
    target: str  # module path the weights went into
    loaded: int  # tensors copied
    ignored: list[str]  # keys of the file that are expected extras (e.g. timm's classifier)

    def __str__(self) -> str:
        ignored = f", ignored {len(self.ignored)} expected extras" if self.ignored else ""
        return f"{self.source}: {self.loaded} tensors -> {self.target}{ignored}"


# timm's ImageNet classifier of EdgeNeXt (and norm_pre of its head-norm-first variants): in the file, not in ours.
EDGENEXT_CLASSIFIER_KEYS = ("head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias",
                            "norm_pre.weight", "norm_pre.bias")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file or a `.pth`/`.pt` file (a plain state dict, or one under "model" or
    "state_dict"), on the CPU. Never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(str(path), device="cpu")
    if path.suffix not in (".pth", ".pt"):
        raise ValueError(f"{path}: expected a .pth, .pt or .safetensors weight file")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (names -> tensors)")
    return obj


def load_mapped(module: nn.Module, tensors: dict[str, torch.Tensor], mapping: dict[str, str], *, source: str,
                target: str, optional_extras: tuple[str, ...] = ()) -> LoadSummary:
    """Copy `tensors[file_key]` into `module`'s `mapping[file_key]` for every entry of `mapping`, which must
    cover the module's whole state dict. Anything missing, unexpected (outside `mapping` and `optional_extras`)
    or of the wrong shape raises one WeightMismatchError naming each key; nothing is copied then."""
    own = module.state_dict()
    missing = [k for k in mapping if k not in tensors]
    unexpected = [k for k in tensors if k not in mapping and k not in optional_extras]
    wrong_shape = [(k, tuple(tensors[k].shape), tuple(own[m].shape)) for k, m in mapping.items()
                   if k in tensors and tensors[k].shape != own[m].shape]
    if missing or unexpected or wrong_shape:
        raise WeightMismatchError(source, missing, unexpected, wrong_shape)
    module.load_state_dict({m: tensors[k] for k, m in mapping.items()}, strict=True)
    return LoadSummary(source, target, len(mapping), [k for k in tensors if k in optional_extras])


def _feature(model_or_feature: nn.Module) -> Feature:
    feature = model_or_feature if isinstance(model_or_feature, Feature) else getattr(model_or_feature, "feature", None)
    if not isinstance(feature, Feature):
        raise TypeError(f"expected a Feature or a model with a .feature, got {type(model_or_feature).__name__}")
    return feature


def load_depth_anything(model_or_feature: nn.Module, path: str | Path) -> LoadSummary:
    """Depth Anything V2 release (`depth_anything_v2_vit{s,b,l}.pth`: DINOv2 under `pretrained.*`, the DPT head
    under `depth_head.*`) -> `feature.dino.depth_anything.*`. Marks the ViT as initialised."""
    feature = _feature(model_or_feature)
    module = feature.dino.depth_anything
    mapping = {k: k for k in module.state_dict()}  # the release uses our layout below depth_anything
    summary = load_mapped(module, read_state_dict(path), mapping, source=str(path),
                          target="feature.dino.depth_anything")
    feature.vit_initialised_from = str(path)
    return summary


def load_edgenext(model_or_feature: nn.Module, path: str | Path) -> LoadSummary:
    """timm `edgenext_small` ImageNet weights (`stem.*`, `stages.*`, plus its classifier `head.*`, ignored)
    -> `feature.stem`, `feature.stages`."""
    feature = _feature(model_or_feature)
    module = nn.ModuleDict({"stem": feature.stem, "stages": feature.stages})  # a view: same parameters
    mapping = {k: k for k in module.state_dict()}  # timm's names are ours below `feature.`
    return load_mapped(module, read_state_dict(path), mapping, source=str(path), target="feature.stem/stages",
                       optional_extras=EDGENEXT_CLASSIFIER_KEYS)


def load_pretrained(model_or_feature: nn.Module, cfg: PretrainedConfig) -> list[LoadSummary]:
    """Load the backbone files named in `model.pretrained` (each optional) and refuse a frozen ViT that would
    stay random unless `allow_random_vit` is set."""
    summaries = []
    if cfg.depth_anything:
        summaries.append(load_depth_anything(model_or_feature, cfg.depth_anything))
    if cfg.edgenext:
        summaries.append(load_edgenext(model_or_feature, cfg.edgenext))
    require_initialised_vit(model_or_feature, cfg.allow_random_vit)
    return summaries


def require_initialised_vit(model_or_feature: nn.Module, allow_random: bool) -> None:
    """A frozen DepthAnything that no loader has filled gives random features forever: stop unless allowed.
    Loaders of whole-model checkpoints set `feature.vit_initialised_from` too."""
    feature = _feature(model_or_feature)
    if feature.freeze_vit and feature.vit_initialised_from is None and not allow_random:
        raise ConfigError(
            "model.pretrained.depth_anything",
            "a Depth Anything V2 file (or model.init_from): the frozen ViT is still random; "
            "model.pretrained.allow_random_vit=true allows that for the demo only",
        )
