"""`python -m stereo demo-pair --out DIR`: the Middlebury 2014 motorcycle pair that scikit-image bundles (no download),
as `left.png`, `right.png` and its ground truth `disp.pfm`, to try `infer` on a real pair (`make demo-pair`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from stereo.data.codecs import encode_pfm, encode_png


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("shards/demo/motorcycle"), help="output directory")


def run(args: argparse.Namespace) -> int:
    from skimage.data import stereo_motorcycle

    left, right, disp = stereo_motorcycle()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in (("left.png", encode_png(left)), ("right.png", encode_png(right)), ("disp.pfm", encode_pfm(disp))):
        (args.out / name).write_bytes(data)
    print(f"wrote {args.out}/left.png, right.png ({left.shape[1]}x{left.shape[0]}) and disp.pfm (ground truth)")
    return 0
