"""`python -m stereo train CONFIG [a.b=value ...]`, launched by torchrun (or Slurm through jobs/)."""

from __future__ import annotations

import os

import torch

from stereo.config import load_config


def add_arguments(parser) -> None:
    parser.add_argument("config", help="a file under configs/ (name or path)")
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides, type-checked")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)  # a bad config fails here, before any process group starts
    if torch.cuda.is_available():  # a config whose planned peak memory exceeds the GPU's stops here (exit 2)
        from stereo.plan import check_fits, local_gpu

        check_fits(cfg, int(os.environ.get("WORLD_SIZE", "1")), local_gpu(int(os.environ.get("LOCAL_RANK", "0"))))
    from stereo.train.loop import train

    return train(cfg, list(args.overrides))
