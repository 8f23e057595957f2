"""`python -m stereo metrics --pred P --gt G [--mask M] [--nocc N]`: the metrics of one pair, printed as JSON.

Disparity files: `.pfm` (float pixels; inf/NaN = no ground truth) or `.png` (16-bit, value / 256, 0 = no ground
truth: the KITTI encoding). Masks: 8-bit PNG, non-zero = the pixel counts. Without `--mask` the ground truth's own
invalid marker decides (see stereo.eval.metrics).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from stereo.data.codecs import CodecError, decode_disp, decode_mask
from stereo.eval.metrics import image_metrics

DISPARITY_CODEC_BY_SUFFIX = {".pfm": "pfm", ".png": "kitti.png"}


def read_disparity(path: Path) -> np.ndarray:
    codec = DISPARITY_CODEC_BY_SUFFIX.get(path.suffix.lower())
    if codec is None:
        raise CodecError(f"{path}: expected a .pfm or 16-bit .png (x256) disparity file, got {path.suffix!r}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CodecError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return decode_disp(data, codec, str(path))


def read_mask(path: Path) -> np.ndarray:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CodecError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return decode_mask(data, "nonzero", str(path))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", type=Path, required=True, help="predicted disparity (.pfm or 16-bit .png x256)")
    parser.add_argument("--gt", type=Path, required=True, help="ground-truth disparity (.pfm or 16-bit .png x256)")
    parser.add_argument("--mask", type=Path, help="valid-pixel mask (8-bit PNG, non-zero = evaluated)")
    parser.add_argument("--nocc", type=Path, help="non-occluded mask (8-bit PNG, non-zero = non-occluded)")
    parser.add_argument("--max-disp", type=float, help="also drop pixels with gt >= this (default: no cap)")


def run(args: argparse.Namespace) -> int:
    try:
        pred, gt = read_disparity(args.pred), read_disparity(args.gt)
        valid = read_mask(args.mask) if args.mask else None
        nocc = read_mask(args.nocc) if args.nocc else None
    except CodecError as exc:
        print(f"metrics: {exc}", file=sys.stderr)
        return 1
    try:
        values = image_metrics(pred, gt, valid, nocc, args.max_disp)
    except ValueError as exc:  # shapes that do not match
        print(f"metrics: {args.pred} vs {args.gt}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(values, indent=2))
    return 0
