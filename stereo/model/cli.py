"""`python -m stereo model summary --size S [--tsv]`: the state-dict manifest or parameter counts.

The model is built on the meta device: no memory, no weights, a second or two even for ViT-L.
"""

from __future__ import annotations

import argparse
import sys

import torch

from stereo.config.schema import ModelConfig
from stereo.model.backbone import SIZES

TSV_HEADER = "key\tshape\tdtype"


def manifest_rows(model: torch.nn.Module) -> list[tuple[str, str, str]]:
    """(key, shape as `64,3,7,7` or empty for scalars, dtype) for every state-dict entry, in order."""
    return [(k, ",".join(str(s) for s in v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in model.state_dict().items()]


def manifest_tsv(model: torch.nn.Module) -> str:
    return "\n".join([TSV_HEADER] + ["\t".join(row) for row in manifest_rows(model)]) + "\n"


def counts_table(model: torch.nn.Module) -> str:
    lines = [f"{'module':<20} {'params':>13} {'trainable':>13}"]
    for name, child in model.named_children():
        params = list(child.parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        lines.append(f"{name:<20} {total:>13,} {trainable:>13,}")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines.append(f"{'TOTAL':<20} {total:>13,} {trainable:>13,}")
    lines.append(f"state-dict entries: {len(model.state_dict())}")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    summary = sub.add_parser("summary", help="state-dict manifest (--tsv) or parameter counts per module")
    summary.add_argument("--size", choices=SIZES, default="vitl")
    summary.add_argument("--tsv", action="store_true", help="key<TAB>shape<TAB>dtype, as the released manifests")


def run(args: argparse.Namespace) -> int:
    from stereo.model import build_model

    with torch.device("meta"):
        model = build_model(ModelConfig(size=args.size))
    sys.stdout.write(manifest_tsv(model) if args.tsv else counts_table(model))
    return 0
