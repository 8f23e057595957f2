"""`python -m stereo export-onnx SOURCE --out model.onnx [--iters N] [--hierarchical] [--precision fp16] ...`.

SOURCE is a run directory (its newest complete checkpoint, EMA weights when the run kept them), an exported or
released `.pth` / `.safetensors`, or a released checkpoint folder (`model_best_bp2.pth` + `cfg.yaml`). Writes the
.onnx file, its JSON sidecar and the reference pair (stereo/deploy/onnx_export.py; docs/deploy.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from stereo.config.errors import ConfigError
from stereo.data.codecs import CodecError
from stereo.deploy.onnx_export import ExportError, ExportSpec, export_onnx
from stereo.model.pretrained import WeightMismatchError

WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")


def resolve_source(source: Path) -> Path:
    """A run directory or a weight file as it is; a released folder -> its one weight file."""
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such run directory, checkpoint file or released folder")
    if source.is_file() or (source / "checkpoints").is_dir():
        return source
    weights = sorted(p for p in source.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if len(weights) != 1:
        raise FileNotFoundError(f"{source}: neither a run directory (no checkpoints/) nor a released folder with "
                                f"one weight file (found {[p.name for p in weights] or 'none'})")
    return weights[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="run directory, .pth/.safetensors, or released checkpoint folder")
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file (.json, .reference.npz beside)")
    parser.add_argument("--iters", type=int, help="GRU iterations fixed in the graph (default: model.valid_iters)")
    parser.add_argument("--hierarchical", action="store_true",
                        help="half-resolution pass first, in the graph (sides then multiples of 64)")
    parser.add_argument("--height", type=int, default=480, help="example height traced, also the reference pair's")
    parser.add_argument("--width", type=int, default=640, help="example width")
    parser.add_argument("--min-side", type=int, help="smallest height/width the graph takes (default 2 x multiple)")
    parser.add_argument("--max-side", type=int, default=1344, help="largest height/width (1344 at most when dynamic)")
    parser.add_argument("--static", action="store_true", help="height and width fixed at --height x --width "
                                                              "(needed past 1344 px)")
    parser.add_argument("--batch", type=int, default=1, help="batch size fixed in the graph")
    parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                        help="fp16: half-precision graph with the overflow-prone operations in fp32")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (17 or newer)")
    parser.add_argument("--external-data", action="store_true",
                        help="weights in OUT.data even under protobuf's 2 GB limit (always past it)")
    parser.add_argument("--config", help="model config when the checkpoint stores none (a file or configs/ name)")
    parser.add_argument("--size", choices=["tiny", "vits", "vitb", "vitl"], help="model size when no config is known")


def run(args: argparse.Namespace) -> int:
    from stereo.eval.cli import load_model

    try:
        ckpt = resolve_source(args.source)
        model, cfg, description = load_model(ckpt, args.config, args.size, torch.device("cpu"))
    except (FileNotFoundError, ValueError, CodecError, WeightMismatchError) as exc:
        print(f"export-onnx: {exc}", file=sys.stderr)
        return 1
    spec = ExportSpec(iters=args.iters or cfg.model.valid_iters, hierarchical=args.hierarchical, height=args.height,
                      width=args.width, batch=args.batch, opset=args.opset, min_side=args.min_side,
                      max_side=args.max_side, static=args.static, precision=args.precision,
                      external_data=True if args.external_data else None)
    try:
        result = export_onnx(model, args.out, spec, source=description,
                             log=lambda text: print(text, file=sys.stderr))
    except ExportError as exc:
        raise ConfigError("export-onnx", str(exc), source=str(args.source)) from None
    meta = result.meta
    sides = " x ".join(f"{meta[n]['min']}..{meta[n]['max']} (multiples of {meta[n]['multiple_of']})"
                       if meta[n]["dynamic"] else f"{meta[n]['size']} (fixed)" for n in ("height", "width"))
    print(f"export-onnx: {description} -> {result.onnx}"
          f"{f' + {result.external_data.name}' if result.external_data else ''}: {cfg.model.size}, "
          f"{spec.iters} iterations{', hierarchical' if spec.hierarchical else ''}, opset {spec.opset}, "
          f"{spec.precision}; height x width {sides}; batch fixed at {spec.batch} (torch.export guards it); pad "
          f"outside the graph (replicate, to multiples of {spec.divisor}: stereo.deploy.runtime does it)",
          file=sys.stderr)
    print(json.dumps({k: meta[k] for k in ("onnx", "external_data", "iterations", "opset", "height", "width")}))
    return 0
