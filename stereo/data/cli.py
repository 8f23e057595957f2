"""`python -m stereo shards`: convert a public data set (raw directory) into WebDataset shards + manifest.json."""

from __future__ import annotations

import argparse
import sys

from stereo.data.sample import encode_checked
from stereo.data.shards import ShardWriteError, write_shards
from stereo.data.sources import SOURCES, SourceError, get_source, parse_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    lines = [f"  {name}: " + (", ".join(f"{k}={v!r}" for k, v in src.options().items()) or "(no options)")
             for name, src in SOURCES.items()]
    parser.epilog = "source options (--option NAME=VALUE):\n" + "\n".join(lines) + "\nlayouts: docs/data.md"
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--dataset", required=True, choices=sorted(SOURCES), help="which data set --src holds")
    parser.add_argument("--src", required=True, help="the data set's root folder (for generic: the list file)")
    parser.add_argument("--out", required=True, help="output folder for NNNNNN.tar shards and manifest.json")
    parser.add_argument("--shard-size", default="1GB", help="target shard size (e.g. 1GB, 500MB); default 1GB")
    parser.add_argument("--workers", type=int, default=None, help="parallel writer processes (default: all cores)")
    parser.add_argument("--option", "-o", action="append", default=[], metavar="NAME=VALUE",
                        help="a source option, repeatable (see below)")


def run(args: argparse.Namespace) -> int:
    try:
        samples = get_source(args.dataset).list_samples(args.src, **parse_options(args.option))
        print(f"{args.dataset}: {len(samples)} samples under {args.src}", file=sys.stderr)
        manifest = write_shards(samples, encode_checked, args.out, args.dataset,
                                shard_bytes=args.shard_size, workers=args.workers)
    except (SourceError, ShardWriteError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards, "
          f"{len(manifest['bad_samples'])} bad samples skipped", file=sys.stderr)
    return 0
