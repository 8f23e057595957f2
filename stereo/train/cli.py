"""`python -m stereo train CONFIG [a.b=value ...]`, launched by torchrun (or Slurm through jobs/).

The config and the paths it names are checked before any process group or run directory exists (exit 2); then
the run goes through stereo.train.failures.run_to_exit, the one exit path (codes in stereo/exitcodes.py).
"""

from __future__ import annotations

import os

import torch

from stereo.config import load_config
from stereo.train.paths import check_paths


def add_arguments(parser) -> None:
    parser.add_argument("config", help="a file under configs/ (name or path)")
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides, type-checked")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    check_paths(cfg)
    if torch.cuda.is_available():  # a config whose planned peak memory exceeds the GPU's stops here (exit 2)
        from stereo.plan import check_fits, local_gpu

        check_fits(cfg, int(os.environ.get("WORLD_SIZE", "1")), local_gpu(int(os.environ.get("LOCAL_RANK", "0"))))
    from stereo.train.failures import ExitContext, run_to_exit
    from stereo.train.loop import train

    context = ExitContext()
    run_to_exit(lambda: train(cfg, list(args.overrides), context), context)
    return 1  # not reached: run_to_exit ends the process
