"""What a training config points at, checked before anything is created or queued: the data sets' shard sources
(local and remote), the starting weights and the run directory. Each problem names the key and the path; all of
them are reported at once."""

from __future__ import annotations

import os
from pathlib import Path

from stereo.config.errors import ConfigError
from stereo.config.schema import Config


def _piped(source: str) -> bool:
    """`pipe:` commands run in the data workers; only they can tell whether their data exists. Remote sources
    (s3://, http(s)://) are checked here: a manifest read or a listing per source."""
    return source.strip().startswith("pipe:")


def path_problems(cfg: Config) -> list[tuple[str, str]]:
    from stereo.data.shardlist import ShardListError, resolve_shards
    from stereo.train.checkpoint import complete_steps

    problems = []
    if not cfg.data.train:
        problems.append(("data.train", "at least one data set to train on, got none"))
    for split in ("train", "val"):
        for i, spec in enumerate(getattr(cfg.data, split)):
            if _piped(spec.shards):
                continue
            try:
                resolve_shards(spec.shards)
            except ShardListError as exc:
                problems.append((f"data.{split}[{i}].shards", str(exc)))
    resuming = bool(cfg.train.run_dir and complete_steps(Path(cfg.train.run_dir) / "checkpoints"))
    if not resuming:  # a resume takes every weight from its checkpoint
        weights = (("model.init_from", cfg.model.init_from),
                   ("model.pretrained.depth_anything", cfg.model.pretrained.depth_anything),
                   ("model.pretrained.edgenext", cfg.model.pretrained.edgenext))
        problems += [(key, f"an existing file, got {value!r} (not found)")
                     for key, value in weights if value and not Path(value).is_file()]
    problem = unwritable(Path(cfg.train.run_dir or "runs"))
    if problem:
        problems.append(("train.run_dir", problem))
    return problems


def check_paths(cfg: Config) -> None:
    problems = path_problems(cfg)
    if problems:
        raise problems_error(problems)


def problems_error(problems: list[tuple[str, str]]) -> ConfigError:
    """One ConfigError (exit code 2) for all the (key, expected) problems: the first names the key."""
    key, expected = problems[0]
    more = "".join(f"; {k}: {e}" for k, e in problems[1:])
    return ConfigError(key, expected + more)


def unwritable(directory: Path) -> str | None:
    """Why `directory` (existing, or to be created) cannot be written, or None."""
    existing = directory.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"a directory, but {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"a writable directory, but {existing} is not writable by this user"
    return None
