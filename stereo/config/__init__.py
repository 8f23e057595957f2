"""Typed configs: `load_config("stereo_v1", ["optim.lr=5e-5"])` -> Config."""

from stereo.config.errors import ConfigError
from stereo.config.load import dump_yaml, find_config, from_dict, load_config, to_dict
from stereo.config.schema import Config

__all__ = ["Config", "ConfigError", "dump_yaml", "find_config", "from_dict", "load_config", "to_dict"]
