"""`python -m stereo <command> ...`: one entry point; each command lives in its own module.

A command module exposes `add_arguments(parser)` and `run(args) -> int`. Modules are imported only when their
command runs, so `--help` stays fast and the library stays importable without the trainer's dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from stereo.config.errors import ConfigError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("stereo.train.cli", "train FoundationStereo (torchrun/Slurm launch it; CONFIG [a.b=value ...])"),
    "shards": ("stereo.data.cli", "convert a public stereo data set into WebDataset shards"),
    "shards-upload": ("stereo.data.upload", "upload a folder of shards (with its manifest) to s3://, sizes checked"),
    "demo-data": ("stereo.data.demo", "write the procedurally generated demo shards"),
    "demo-pair": ("stereo.data.motorcycle", "write the Middlebury motorcycle pair bundled with scikit-image as PNGs"),
    "bench-data": ("stereo.data.bench", "measure data-loading throughput (decode + augmentation)"),
    "eval": ("stereo.eval.cli", "evaluate a checkpoint on a benchmark (KITTI, Middlebury, ETH3D, Scene Flow)"),
    "metrics": ("stereo.eval.metrics_cli", "EPE / BP-x / D1 for one prediction and ground truth, as JSON"),
    "compare": ("stereo.compare_cli", "compare runs (or a sweep's trials, ranked): metrics, differences, plots"),
    "infer": ("stereo.infer", "disparity (and depth) for one stereo pair"),
    "export": ("stereo.train.export", "write a run's weights in the released checkpoint format"),
    "export-onnx": ("stereo.deploy.cli", "export a run or checkpoint to ONNX (any image size) with a JSON sidecar"),
    "mlflow-upload": ("stereo.train.mlflow_upload", "send a run's metrics.jsonl, pictures and config to MLflow"),
    "bench": ("stereo.bench", "time a training step and inference; peak memory and MFU"),
    "plan": ("stereo.plan.cli", "per-GPU memory, largest batch and time floor of a training config (CPU only)"),
    "model": ("stereo.model.cli", "model tools: summary (state-dict manifest)"),
    "config": ("stereo.config.cli", "validate a config and print it fully resolved"),
    "submit": ("jobs.submit", "submit a training run to Slurm through submitit"),
    "status": ("jobs.manage", "state of a submitted run's Slurm job"),
    "logs": ("jobs.manage", "print a submitted run's job log"),
    "cancel": ("jobs.manage", "cancel a submitted run's Slurm job"),
    "sweep": ("jobs.sweep", "run a hyper-parameter sweep: one Slurm job array (or --local, one trial after another)"),
    "sweep-status": ("jobs.sweep", "a sweep's trials: state, step, best metric so far"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m stereo <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`python -m stereo <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"python -m stereo {name}", description=text)
    if module_name in ("jobs.manage", "jobs.sweep"):
        parser.set_defaults(action=name)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return ConfigError.exit_code
