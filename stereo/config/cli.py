"""`python -m stereo config CONFIG [a.b=value ...]`: validate and print the fully resolved config."""

from stereo.config import dump_yaml, load_config


def add_arguments(parser) -> None:
    parser.add_argument("config", help="a file under configs/ (name or path)")
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides, type-checked")


def run(args) -> int:
    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0
