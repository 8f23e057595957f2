"""`python -m stereo eval --ckpt CKPT --bench NAME --data DIR [--iters N] [--out DIR] [--device D]`.

Writes results.json, results.md, a panel per image and summary.png (see docs/evaluation.md). The checkpoint is a
released-format .pth, one of our exports (.pth / .safetensors) or a run directory (its newest complete checkpoint,
EMA weights when the run kept them, as in training validation). The model config is the one stored with the
checkpoint when there is one, else `--config`, else the released `cfg.yaml` beside the file, else the released
defaults of `--size`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from stereo.config import Config, from_dict, load_config
from stereo.config.errors import ConfigError
from stereo.data.codecs import CodecError
from stereo.data.sample import BadSample
from stereo.data.sources import SourceError, parse_options
from stereo.eval.benchmarks import BENCHMARKS, BenchmarkSamples, get_benchmark
from stereo.eval.metrics import unit
from stereo.eval.model_args import add_model_arguments, device_name
from stereo.eval.runner import evaluate
from stereo.model import build_model
from stereo.model.io import check_state_dict, read_checkpoint, read_released_cfg
from stereo.model.precision import autocast_to, resolve_precision
from stereo.model.pretrained import WeightMismatchError


def _run_directory_weights(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(state dict, config tree, description) of a run directory's newest complete checkpoint.

    Consolidating DeepSpeed/ZeRO checkpoints is the exporter's job; it is imported only on this path, so
    evaluating released or exported weights never needs the trainer's stack.
    """
    from stereo.train.checkpoint import find_checkpoint
    from stereo.train.export import load_checkpoint_weights, read_trainer_state

    step_dir = find_checkpoint(run_dir)
    trainer_state = read_trainer_state(step_dir)
    config = yaml.safe_load(trainer_state["config"])
    use_ema = trainer_state.get("ema") is not None  # EMA weights when the run kept them, as validation uses
    model = build_model(from_dict(config, source=f"{step_dir} (embedded config)").model)
    load_checkpoint_weights(model, step_dir, use_ema)
    return model.state_dict(), config, f"{step_dir} ({'EMA' if use_ema else 'live'} weights)"


def _file_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """(state dict, embedded config tree or None, description) of a .pth / .safetensors checkpoint."""
    state, config = read_checkpoint(path)
    return state, config, str(path)


def model_config(embedded: dict | None, config: str | None, size: str | None, ckpt: Path) -> Config:
    """The checkpoint's own config, else --config, else the released `cfg.yaml` beside it, else --size's defaults."""
    if embedded is not None:
        return from_dict(embedded, source=f"{ckpt} (embedded config)")
    if config is not None:
        return load_config(config)
    cfg = Config()
    released = None if ckpt.is_dir() else read_released_cfg(ckpt)
    if released is not None:
        cfg.model = released
    elif size is None:
        raise ConfigError("--config/--size", f"{ckpt} stores no config and has no cfg.yaml beside it: name the model "
                                             f"with --config C or --size S")
    else:
        cfg.model.size = size
    return cfg


def load_model(ckpt: Path, config: str | None, size: str | None, device: torch.device
               ) -> tuple[torch.nn.Module, Config, str]:
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint file or run directory")
    state, embedded, description = _run_directory_weights(ckpt) if ckpt.is_dir() else _file_weights(ckpt)
    cfg = model_config(embedded, config, size, ckpt)
    if size is not None and config is None and size != cfg.model.size:
        raise ConfigError("--size", f"{cfg.model.size} (the checkpoint's own config), got {size}", source=str(ckpt))
    model = build_model(cfg.model)
    check_state_dict(model, state, f"{description} into a {cfg.model.size} model")  # names each wrong key
    model.load_state_dict(state, strict=True)  # every weight, the frozen ViT included, comes from the checkpoint
    return model.to(device), cfg, description


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--bench", required=True, choices=sorted(BENCHMARKS), help="benchmark protocol")
    parser.add_argument("--data", help="the benchmark's raw directory (official layout) or its shards "
                                        "(default for --bench demo: shards/demo/val)")
    parser.add_argument("--iters", type=int,
                        help="GRU iterations (default: the config's eval.iters, else model.valid_iters)")
    parser.add_argument("--out", type=Path, help="output directory (default runs/eval/<bench>-<checkpoint name>)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N pairs")
    parser.add_argument("--max-disp", type=float,
                        help="drop gt >= this from the metrics (default: no cap; demo: the model's max_disp)")
    parser.add_argument("--option", "-o", action="append", default=[], metavar="NAME=VALUE",
                        help="data source option, repeatable (e.g. passes=clean for sceneflow)")
    parser.add_argument("--no-images", action="store_true", help="skip the per-image panels and summary sheet")


def run(args: argparse.Namespace) -> int:
    bench = get_benchmark(args.bench)
    data = args.data or bench.default_data
    if data is None:
        print(f"eval: --data is required for {bench.name} (its raw directory or shards)", file=sys.stderr)
        return 2
    device = torch.device(device_name(args))
    precision = resolve_precision(args.precision, device, "--precision")
    try:
        samples = BenchmarkSamples(bench, data, args.limit, parse_options(args.option))
        model, cfg, description = load_model(args.ckpt, args.config, args.size, device)
    except (FileNotFoundError, SourceError, CodecError, WeightMismatchError) as exc:
        print(f"eval: {exc}", file=sys.stderr)
        return 1
    iters = args.iters or cfg.eval.iters or cfg.model.valid_iters
    max_disp = args.max_disp if args.max_disp is not None else (
        cfg.model.max_disp if bench.max_disp_from_model else None)
    out = args.out or Path("runs/eval") / f"{bench.name}-{args.ckpt.resolve().name.split('.')[0]}"
    metadata: dict[str, Any] = {
        "benchmark": bench.name, "title": bench.title, "protocol": bench.protocol, "data": str(data),
        "checkpoint": description, "model": cfg.model.size, "iters": iters, "hierarchical": args.hierarchical,
        "precision": precision, "max_disp": max_disp,
        **({f"paper ({bench.headline[0]})": bench.paper} if bench.paper is not None else {}),
    }
    print(f"eval {bench.title}: {description}, {iters} iterations, {device} ({precision})", file=sys.stderr)
    try:
        with autocast_to(precision, device):
            result = evaluate(model, samples, iters, device, out_dir=out, max_disp=max_disp,
                              headline=bench.headline, title=bench.title, save_images=not args.no_images,
                              metadata=metadata, hierarchical=args.hierarchical)
    except (CodecError, BadSample) as exc:  # an unreadable file of the benchmark: name it rather than score less
        print(f"eval: {exc}", file=sys.stderr)
        return 1
    for key in bench.headline:
        value = result[key]
        print(f"{key:>24}: {'-' if value is None else f'{value:.4f} {unit(key)}'}")
    if bench.paper is not None:
        print(f"{'paper':>24}: {bench.paper} ({bench.headline[0]}, FoundationStereo zero-shot)")
    print(f"wrote {out}/results.json, results.md" + ("" if args.no_images else ", images/, summary.png"),
          file=sys.stderr)
    return 0
