"""`python -m stereo config CONFIG [a.b=value ...] [--check]`: validate and print the fully resolved config.

`--check` prints nothing on success: `make train` runs it before torchrun, so that a config error shows alone
(it imports only the config package: ~0.1 s).
"""

from stereo.config import dump_yaml, load_config


def add_arguments(parser) -> None:
    parser.add_argument("config", help="a file under configs/ (name or path)")
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides, type-checked")
    parser.add_argument("--check", action="store_true", help="only validate (exit 2 with the error, else 0)")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if not args.check:
        print(dump_yaml(cfg), end="")
    return 0
