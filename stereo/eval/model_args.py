"""The checkpoint arguments shared by `eval` and `infer`, without torch: a command names a missing file at once
instead of after seconds of imports."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The checkpoint and how to run it (see stereo.eval.cli.load_model)."""
    parser.add_argument("--ckpt", type=Path, required=True, help="released .pth, our export, or a run directory")
    parser.add_argument("--config", help="model config when the checkpoint stores none (a file or configs/ name)")
    parser.add_argument("--size", choices=["tiny", "vits", "vitb", "vitl"], help="model size when no config is known")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                        help="autocast (default auto: bf16 on a GPU, fp32 on the CPU; fp16 as the released script; "
                             "disparities stay fp32)")
    parser.add_argument("--hierarchical", action="store_true",
                        help="for large images (>1K): a half-resolution pass starts the full one (released --hiera)")


def missing_path(args: argparse.Namespace, files: tuple[str, ...]) -> str | None:
    """`--left x.png: no such file` for the first of these arguments naming nothing (--ckpt may be a directory)."""
    for name in files:
        path = getattr(args, name)
        if path is not None and not Path(path).exists():
            return f"--{name} {path}: no such file or directory"
    return None


def device_name(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")
