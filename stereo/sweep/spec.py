"""The sweep file (`configs/sweeps/*.yaml`) -> a validated SweepSpec -> its trials, each a validated Config.

    name: finetune_lr            # optional: the file's name; the sweep lives in runs/sweeps/<name>/
    config: finetune_custom      # the base config (a name under configs/ or a path)
    overrides: {train.steps: 2000}          # optional: the same for every trial
    grid: {optim.lr: [5.0e-6, 1.0e-5]}      # every combination of these lists ...
    random:                                 # ... crossed with `trials` seeded draws of these
      seed: 0
      trials: 4
      keys:
        loss.gamma: {uniform: [0.8, 0.95]}
        optim.weight_decay: {log_uniform: [1.0e-6, 1.0e-3]}
        model.freeze_bn: {choice: [true, false]}
    metric: val/epe/pooled       # what `compare` ranks by
    direction: min               # min or max
    max_concurrent: 2            # trials running at once (the job array's %N)
    early_stop:                  # optional: successive halving on the metric (stereo/train/early_stop.py)
      rungs: [500, 1000]         # steps where trials are compared (validation steps)
      eta: 2                     # the best 1/eta of the trials at a rung so far continue

Every problem is a ConfigError naming the sweep file (and the trial, for a trial's config) and the key.
"""

from __future__ import annotations

import difflib
import itertools
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from stereo.config import Config, ConfigError, load_config
from stereo.config.load import CONFIG_DIR
from stereo.config.load import flatten

SWEEP_DIR = CONFIG_DIR / "sweeps"
SWEEPS_ROOT = Path("runs/sweeps")  # where sweeps run: runs/sweeps/<name>/ (stereo/sweep/book.py)
TOP_KEYS = ("name", "config", "overrides", "grid", "random", "metric", "direction", "max_concurrent", "early_stop")
RANDOM_KEYS = ("seed", "trials", "keys")
EARLY_STOP_KEYS = ("rungs", "eta")
RUNGS_DIR = "rungs"  # in the sweep directory: the early-stopping ledger the trials share
DISTRIBUTIONS = ("uniform", "log_uniform", "choice")
SIGNIFICANT_DIGITS = 3  # random draws are rounded: readable overrides, and nothing a search can tell apart is lost


@dataclass(frozen=True)
class Distribution:
    kind: str  # one of DISTRIBUTIONS
    values: tuple  # (low, high), or the choices

    def draw(self, rng: random.Random) -> Any:
        if self.kind == "choice":
            return self.values[rng.randrange(len(self.values))]
        low, high = self.values
        integers = all(isinstance(v, int) for v in self.values)
        if self.kind == "uniform":
            return rng.randint(low, high) if integers else _round(rng.uniform(low, high))
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
        return round(value) if integers else _round(value)


@dataclass
class SweepSpec:
    name: str
    config: str
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)
    random_keys: dict[str, Distribution] = field(default_factory=dict)
    seed: int = 0
    draws: int = 1  # random draws per grid point (1 when nothing is drawn)
    metric: str = "val/epe/pooled"
    direction: str = "min"
    max_concurrent: int = 4
    early_stop: dict[str, Any] = field(default_factory=dict)  # {rungs, eta}; empty: every trial runs to the end
    source: str = ""

    @property
    def varied(self) -> list[str]:
        return [*self.grid, *self.random_keys]

    def trial_overrides(self) -> list[list[str]]:
        """Each trial's varied keys as `a.b=value` overrides: the grid's combinations (last key fastest), each
        crossed with the same seeded random draws."""
        rng = random.Random(self.seed)
        draws = [{key: dist.draw(rng) for key, dist in self.random_keys.items()} for _ in range(self.draws)]
        points = [dict(zip(self.grid, values)) for values in itertools.product(*self.grid.values())]
        return [[f"{k}={render(v)}" for k, v in {**point, **drawn}.items()] for point in points for drawn in draws]

    def fixed_overrides(self) -> list[str]:
        return [f"{k}={render(v)}" for k, v in self.overrides.items()]

    def with_overrides(self, texts: list[str]) -> "SweepSpec":
        """Command-line `a.b=value` overrides join the sweep's fixed overrides (they apply to every trial)."""
        merged = dict(self.overrides)
        for text in texts:
            if "=" not in text:
                raise ConfigError(text, "an override of the form a.b=value", source="command line")
            key, value = (part.strip() for part in text.split("=", 1))
            if key in self.varied:
                raise ConfigError(key, f"varied by the sweep (grid/random in {self.source}), so not settable for "
                                       "every trial", source="command line")
            merged[key] = yaml.safe_load(value) if value else None
        return replace(self, overrides=merged)

    def to_raw(self) -> dict[str, Any]:
        """The sweep file's mapping (parse_sweep reads it back to an equal spec)."""
        raw: dict[str, Any] = {"name": self.name, "config": self.config}
        if self.overrides:
            raw["overrides"] = dict(self.overrides)
        if self.grid:
            raw["grid"] = dict(self.grid)
        if self.random_keys:
            raw["random"] = {"seed": self.seed, "trials": self.draws,
                             "keys": {k: {d.kind: list(d.values)} for k, d in self.random_keys.items()}}
        raw.update(metric=self.metric, direction=self.direction, max_concurrent=self.max_concurrent)
        if self.early_stop:
            raw["early_stop"] = dict(self.early_stop)
        return raw

    def early_stop_overrides(self, sweep_dir: Path) -> list[str]:
        """The trials' `early_stop` section: one ledger for all, the sweep's metric and direction."""
        if not self.early_stop:
            return []
        settings = {"ledger": str((sweep_dir / RUNGS_DIR).resolve()), **self.early_stop, "metric": self.metric,
                    "direction": self.direction}
        return [f"early_stop.{k}={render(v)}" for k, v in settings.items()]


@dataclass
class Trial:
    id: str  # t00, t01, ...
    overrides: list[str]  # the varied keys only
    cfg: Config  # fully resolved: base + fixed overrides + command line + varied keys, run_dir and wandb group set


def render(value: Any) -> str:
    """A value as override text that the config loader reads back as the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


def _round(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def find_sweep(name: str | Path) -> Path:
    """As given, else under configs/sweeps/ (with or without .yaml); a sweep directory (or the name of one under
    runs/sweeps/) means the sweep.yaml it was started with."""
    for path in (Path(name), SWEEP_DIR / str(name), SWEEP_DIR / f"{name}.yaml", Path(name) / "sweep.yaml",
                 SWEEPS_ROOT / str(name) / "sweep.yaml"):
        if path.is_file():
            return path
    known = ", ".join(sorted(p.stem for p in SWEEP_DIR.glob("*.yaml")))
    raise ConfigError("sweep", f"a sweep file or sweep directory, got {str(name)!r} (known: {known})")


def load_sweep(name: str | Path) -> SweepSpec:
    path = find_sweep(name)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("yaml", f"valid YAML ({exc})", source=str(path)) from None
    try:
        return parse_sweep(raw, default_name=path.stem if path.name != "sweep.yaml" else path.parent.name,
                           source=str(path))
    except ConfigError as exc:
        raise exc.with_source(str(path)) from None


def parse_sweep(raw: Any, default_name: str, source: str) -> SweepSpec:
    _mapping(raw, "(top level)")
    _known(raw, TOP_KEYS, "")
    if "config" not in raw:
        raise ConfigError("config", "the base config of every trial (a name under configs/ or a path)")
    spec = SweepSpec(name=str(raw.get("name", default_name)), config=_text(raw["config"], "config"), source=source)
    if not spec.name or "/" in spec.name or spec.name.startswith("."):
        raise ConfigError("name", f"a plain directory name, got {spec.name!r}")
    # nested mappings become dotted keys: `{train: {steps: 2000}}` sets train.steps, not the whole train section
    spec.overrides = flatten(_mapping(raw.get("overrides") or {}, "overrides"))
    for key, values in _mapping(raw.get("grid") or {}, "grid").items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key}", f"a non-empty list of values, got {values!r}")
        spec.grid[str(key)] = values
    if raw.get("random") is not None:
        _parse_random(_mapping(raw["random"], "random"), spec)
    if not spec.varied:
        raise ConfigError("grid", "at least one key to vary (under grid: or random.keys:)")
    for key in spec.varied:
        if key in spec.overrides:
            raise ConfigError(f"overrides.{key}", "a key that no trial varies (it is also under grid/random)")
    spec.metric = _text(raw.get("metric", spec.metric), "metric")
    if not spec.metric.startswith(("val/", "train/", "loss")):
        raise ConfigError("metric", f"a logged metric such as val/epe/pooled, got {spec.metric!r}")
    spec.direction = raw.get("direction", spec.direction)
    if spec.direction not in ("min", "max"):
        raise ConfigError("direction", f"min or max, got {spec.direction!r}")
    spec.max_concurrent = raw.get("max_concurrent", spec.max_concurrent)
    if isinstance(spec.max_concurrent, bool) or not isinstance(spec.max_concurrent, int) or spec.max_concurrent < 1:
        raise ConfigError("max_concurrent", f"an integer >= 1, got {spec.max_concurrent!r}")
    if raw.get("early_stop") is not None:
        section = _mapping(raw["early_stop"], "early_stop")
        _known(section, EARLY_STOP_KEYS, "early_stop")
        if "rungs" not in section:
            raise ConfigError("early_stop.rungs", "the steps where trials are compared, e.g. [500, 1000]")
        if not spec.metric.startswith("val/"):
            raise ConfigError("metric", f"a validation metric (val/...) for early_stop, got {spec.metric!r}")
        spec.early_stop = dict(section)  # the values are checked with each trial's config (early_stop.*)
    return spec


def _parse_random(section: dict, spec: SweepSpec) -> None:
    _known(section, RANDOM_KEYS, "random")
    for key in ("seed", "trials"):
        value = section.get(key, 0 if key == "seed" else None)
        if isinstance(value, bool) or not isinstance(value, int) or (key == "trials" and value < 1):
            raise ConfigError(f"random.{key}", f"an integer{' >= 1' if key == 'trials' else ''}, got {value!r}")
    spec.seed, spec.draws = section.get("seed", 0), section["trials"]
    keys = _mapping(section.get("keys"), "random.keys")
    if not keys:
        raise ConfigError("random.keys", "at least one key with a distribution ({uniform|log_uniform|choice: ...})")
    for key, entry in keys.items():
        where = f"random.keys.{key}"
        if key in spec.grid:
            raise ConfigError(where, "a key that is not also under grid")
        if not isinstance(entry, dict) or len(entry) != 1 or next(iter(entry)) not in DISTRIBUTIONS:
            raise ConfigError(where, f"one of {{uniform: [low, high]}}, {{log_uniform: [low, high]}}, "
                                     f"{{choice: [a, b, ...]}}, got {entry!r}")
        (kind, values), = entry.items()
        if kind == "choice":
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}.choice", f"a non-empty list, got {values!r}")
        elif not (isinstance(values, list) and len(values) == 2
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
                  and values[0] < values[1] and (kind == "uniform" or values[0] > 0)):
            positive = " > 0" if kind == "log_uniform" else ""
            raise ConfigError(f"{where}.{kind}", f"[low, high] with low < high{positive}, got {values!r}")
        spec.random_keys[str(key)] = Distribution(kind, tuple(values))


def _mapping(value: Any, key: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(key, f"a mapping, got {value!r}")
    return value


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"a non-empty string, got {value!r}")
    return value


def _known(section: dict, names: tuple[str, ...], prefix: str) -> None:
    for key in section:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            dotted = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(dotted, f"unknown key (valid: {', '.join(names)})",
                              hint=(f"{prefix}.{close[0]}" if prefix else close[0]) if close else None)


def build_trials(spec: SweepSpec, sweep_dir: Path) -> list[Trial]:
    """Every trial's config, loaded and validated (keys, values, the model it builds, the files it names) before
    anything runs."""
    combos = spec.trial_overrides()
    width = max(2, len(str(len(combos) - 1)))
    trials, checked_models, checked_paths = [], set(), set()
    for index, varied in enumerate(combos):
        trial_id = f"t{index:0{width}d}"
        everything = [*spec.fixed_overrides(), *varied, *spec.early_stop_overrides(sweep_dir)]
        try:
            cfg = load_config(spec.config, everything)
            if repr(cfg.model) not in checked_models:
                _check_model(cfg)
                checked_models.add(repr(cfg.model))
            _check_paths(cfg, checked_paths)
        except ConfigError as exc:
            raise ConfigError(exc.key, exc.expected, hint=exc.hint,
                              source=f"sweep {spec.source}, trial {trial_id} ({' '.join(varied)})") from None
        cfg.train.run_dir = str((sweep_dir / trial_id).resolve())
        cfg.logging.group = spec.name  # wandb: one group per sweep, the run name carries the varied keys
        cfg.logging.tags = [*cfg.logging.tags, f"sweep:{spec.name}"]
        trials.append(Trial(trial_id, varied, cfg))
    return trials


def _check_model(cfg: Config) -> None:
    """Build the model on the meta device: config errors that only its constructor sees surface now."""
    import torch

    from stereo.model import build_model

    with torch.device("meta"):
        build_model(cfg.model)


def _check_paths(cfg: Config, checked: set) -> None:
    """The data and starting weights each trial names exist (each distinct path checked once)."""
    from stereo.data.shardlist import ShardListError, resolve_shards

    for split in ("train", "val"):
        for i, spec in enumerate(getattr(cfg.data, split)):
            if spec.shards in checked:
                continue
            try:
                resolve_shards(spec.shards)
            except ShardListError as exc:
                raise ConfigError(f"data.{split}[{i}].shards", f"readable shards ({exc})") from None
            checked.add(spec.shards)
    files = {"model.init_from": cfg.model.init_from, "model.pretrained.depth_anything":
             cfg.model.pretrained.depth_anything, "model.pretrained.edgenext": cfg.model.pretrained.edgenext}
    for key, path in files.items():
        if path and path not in checked:
            if not Path(path).is_file():
                raise ConfigError(key, f"an existing file, got {path!r}")
            checked.add(path)
