"""`python -m stereo infer --ckpt CKPT --left L --right R --out DIR [--iters N] [--focal F --baseline B]
[--hierarchical] [--engine onnx]`.

Writes `disp.pfm` (float32 px), `disp.png` (16-bit, value = disparity x 256, as KITTI), `disp_color.png`
(turbo over the 1st-99th percentile, its colour bar in px below the image) and, with --focal (px) and --baseline (m), `depth.pfm` (metres, 0 where the disparity is not positive).
Any image size works. With `--engine onnx` (the default for a .onnx CKPT) the pair runs through onnxruntime on the CPU
from an `export-onnx` file, whose sidecar fixes the iterations and hierarchical setting; the outputs are the same.
Otherwise the checkpoint is a released-format .pth, one of our exports or a run directory; its model
config comes from the checkpoint, else --config, else the released cfg.yaml beside it, else the released defaults
of --size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from stereo import exitcodes
from stereo.config.errors import ConfigError
from stereo.data.codecs import CodecError, encode_png, read_image, write_pfm
from stereo.eval.model_args import add_model_arguments, device_name, missing_path

# torch and the model are imported once the arguments are checked: a missing file is named at once, not after them

PNG_SCALE = 256.0


def disparity_to_depth(disp: np.ndarray, focal_px: float, baseline_m: float) -> np.ndarray:
    depth = np.zeros_like(disp, dtype=np.float32)
    positive = disp > 0
    depth[positive] = focal_px * baseline_m / disp[positive]
    return depth


def colour_scale(disp: np.ndarray) -> tuple[float, float]:
    """The colour PNG's range: the 1st to 99th percentile of the finite disparities (outliers cannot wash it out)."""
    finite = disp[np.isfinite(disp)]
    if not finite.size:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(finite, [1, 99]))
    return low, max(high, low + 1e-3)


def describe(disp: np.ndarray) -> str:
    finite = disp[np.isfinite(disp)]
    if not finite.size:
        return "disparity: no finite value"
    low, high = colour_scale(disp)
    return (f"disparity {finite.min():.2f} .. {finite.max():.2f} px (median {np.median(finite):.2f}); "
            f"disp_color.png spans {low:.1f} .. {high:.1f} px")


def write_outputs(disp: np.ndarray, out: Path, focal: float | None, baseline: float | None) -> list[Path]:
    from stereo.pictures import colorize_disparity, with_disparity_bar

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "disp.pfm", out / "disp.png", out / "disp_color.png"]
    write_pfm(written[0], disp)
    written[1].write_bytes(encode_png(np.clip(np.round(disp * PNG_SCALE), 0, 65535).astype(np.uint16)))
    low, high = colour_scale(disp)
    written[2].write_bytes(encode_png(with_disparity_bar(colorize_disparity(disp, low, high), low, high)))
    if focal is not None and baseline is not None:
        written.append(out / "depth.pfm")
        write_pfm(written[-1], disparity_to_depth(disp, focal, baseline))
    return written


def read_pair(left_path: Path, right_path: Path) -> tuple[np.ndarray, np.ndarray]:
    for path in (left_path, right_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: image file not found")
    left, right = read_image(left_path), read_image(right_path)
    if left.shape != right.shape:
        raise ValueError(f"{right_path}: {right.shape[1]}x{right.shape[0]} does not match the left image "
                         f"{left_path} ({left.shape[1]}x{left.shape[0]}); a rectified pair has one size")
    return left, right


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--left", type=Path, required=True, help="left image (PNG/JPEG)")
    parser.add_argument("--right", type=Path, required=True, help="right image, same size")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--iters", type=int, help="GRU iterations (default: the config's model.valid_iters)")
    parser.add_argument("--focal", type=float, help="focal length in pixels (with --baseline: writes depth.pfm)")
    parser.add_argument("--baseline", type=float, help="stereo baseline in metres")
    parser.add_argument("--engine", choices=["torch", "onnx"],
                        help="torch (PyTorch) or onnx (onnxruntime, CPU; CKPT an export-onnx file); default: "
                             "onnx for a .onnx CKPT")


def run_onnx(args: argparse.Namespace, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The pair through an exported graph; the iterations and hierarchical setting are the graph's own."""
    from stereo.deploy.runtime import OnnxStereo

    engine = OnnxStereo(args.ckpt)
    meta = engine.meta
    for option, given, baked in (("--iters", args.iters, meta["iterations"]),
                                 ("--hierarchical", args.hierarchical or None, meta["hierarchical"] or None)):
        if given is not None and given != baked:
            raise ConfigError(option, f"{baked} (fixed in {args.ckpt}; export again to change it)")
    print(f"infer: {args.ckpt} (onnxruntime, {meta['model']['size']}, {meta['precision']}), "
          f"{left.shape[1]}x{left.shape[0]}, {meta['iterations']} iterations"
          f"{', hierarchical' if meta['hierarchical'] else ''}", file=sys.stderr)
    return engine(left, right)


def run(args: argparse.Namespace) -> int:
    if (args.focal is None) != (args.baseline is None):
        raise ConfigError("--focal/--baseline", "both (depth needs the focal length and the baseline) or neither")
    if missing := missing_path(args, ("left", "right", "ckpt")):
        print(f"infer: {missing}", file=sys.stderr)
        return exitcodes.CONFIG
    import torch

    from stereo.eval.cli import load_model
    from stereo.model.infer import predict
    from stereo.model.precision import autocast_to, resolve_precision
    from stereo.model.pretrained import WeightMismatchError

    device = torch.device(device_name(args))
    precision = resolve_precision(args.precision, device, "--precision")
    try:
        left, right = read_pair(args.left, args.right)
    except (FileNotFoundError, CodecError, ValueError) as exc:  # a bad input file: one line naming it
        print(f"infer: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    if (args.engine or ("onnx" if args.ckpt.suffix == ".onnx" else "torch")) == "onnx":
        try:
            disp = run_onnx(args, left, right)
        except (FileNotFoundError, ValueError) as exc:
            print(f"infer: {exc}", file=sys.stderr)
            return 1
        return _write(disp, args)
    try:
        model, cfg, description = load_model(args.ckpt, args.config, args.size, device)
    except (FileNotFoundError, ValueError, CodecError, WeightMismatchError) as exc:
        print(f"infer: {exc}", file=sys.stderr)
        return 1
    iters = args.iters or cfg.model.valid_iters
    print(f"infer: {description}, {left.shape[1]}x{left.shape[0]}, {iters} iterations on {device} ({precision})",
          file=sys.stderr)

    def tensor(image: np.ndarray) -> "torch.Tensor":
        return torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float().to(device)

    with autocast_to(precision, device):
        disp = predict(model, tensor(left), tensor(right), iters, args.hierarchical)[0, 0].cpu().numpy()
    return _write(disp, args)


def _write(disp: np.ndarray, args: argparse.Namespace) -> int:
    for path in write_outputs(disp, args.out, args.focal, args.baseline):
        print(f"wrote {path}", file=sys.stderr)
    print(describe(disp))
    return 0
