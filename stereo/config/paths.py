"""The files a training config points at, checked before anything is created or queued (`submit`, `train`):
the data sets' shard sources, the starting weights and the run directory. Every problem names the key and the
path, and all of them are reported at once."""

from __future__ import annotations

import os
from pathlib import Path

from stereo.config.errors import ConfigError
from stereo.config.schema import Config


class ConfigPathError(ConfigError):
    """One or more config paths that do not resolve; `problems` lists (key, what was expected) for each."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__(*problems[0])

    def render(self) -> str:
        if len(self.problems) == 1:
            return super().render()
        where = f"{self.source}: " if self.source else ""
        return f"{where}{len(self.problems)} paths do not resolve:" + "".join(
            f"\n  {key}: {expected}" for key, expected in self.problems)


def is_remote(source: str) -> bool:
    """`pipe:` commands and URLs (s3://, http://) are read by the data workers; only they can tell if these exist."""
    return source.strip().startswith("pipe:") or "://" in source


def path_problems(cfg: Config) -> list[tuple[str, str]]:
    """(key, expected) for every shard source, weights file and run directory of `cfg` that cannot be used."""
    from stereo.data.shardlist import ShardListError, resolve_shards

    problems = []
    for split in ("train", "val"):
        for i, spec in enumerate(getattr(cfg.data, split)):
            if is_remote(spec.shards):
                continue
            try:
                shards = resolve_shards(spec.shards)
            except ShardListError as exc:
                problems.append((f"data.{split}[{i}].shards", str(exc)))
                continue
            missing = [s.url for s in shards if not s.is_pipe and not is_remote(s.url) and not Path(s.url).is_file()]
            if missing:
                problems.append((f"data.{split}[{i}].shards", f"{spec.shards} lists {len(missing)} shard files that "
                                 f"do not exist (first: {missing[0]})"))
    run_dir = Path(cfg.train.run_dir or "runs")
    if not any((run_dir / "checkpoints").glob("step_*/COMPLETE")):  # a resume takes every weight from its checkpoint
        for key, value in (("model.init_from", cfg.model.init_from),
                           ("model.pretrained.depth_anything", cfg.model.pretrained.depth_anything),
                           ("model.pretrained.edgenext", cfg.model.pretrained.edgenext)):
            if value and not Path(value).is_file():
                problems.append((key, f"an existing weights file, got {value} (no such file)"))
    problem = unwritable(run_dir)
    if problem:
        problems.append(("train.run_dir", problem))
    return problems


def check_paths(cfg: Config) -> None:
    """Raise ConfigPathError (a ConfigError: exit code 2) naming every path of `cfg` that cannot be used."""
    problems = path_problems(cfg)
    if problems:
        raise ConfigPathError(problems)


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
