"""Public stereo data sets as lists of raw samples: `SOURCES[name].list_samples(root, **options)`.

Each source reads one data set's directory layout as distributed (see docs/data.md) and returns `RawSample`s
sorted by key; `load_raw(raw)` decodes one straight from its files (the same dict as `decode_sample`), so
benchmarks run on raw directories and training reads the same bytes from shards.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stereo.data.sample import RawSample, load_raw
from stereo.data.sources import (
    crestereo,
    eth3d,
    fallingthings,
    fsd,
    generic,
    instereo2k,
    kitti,
    middlebury,
    sceneflow,
    sintel,
    vkitti2,
)
from stereo.data.sources.common import SourceError

__all__ = ["SOURCES", "Source", "SourceError", "RawSample", "load_raw", "get_source", "parse_options"]


@dataclass(frozen=True)
class Source:
    name: str
    lister: Callable[..., list[RawSample]]  # (root, **options) -> samples, possibly empty
    layout: str  # the expected directory layout, quoted in errors and docs

    def options(self) -> dict[str, Any]:
        """Option name -> default (the lister's keyword-only parameters)."""
        params = inspect.signature(self.lister).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def list_samples(self, root: str | Path, **options: Any) -> list[RawSample]:
        root = Path(root)
        unknown = sorted(set(options) - set(self.options()))
        if unknown:
            known = ", ".join(self.options()) or "none"
            raise SourceError(f"{self.name}: unknown option(s) {', '.join(unknown)} (options: {known})")
        if not root.exists():
            raise SourceError(f"{self.name}: {root} does not exist; expected layout:\n{self.layout}")
        samples = sorted(self.lister(root, **options), key=lambda s: s.key)
        if not samples:
            raise SourceError(f"{self.name}: no samples found under {root} (options {options or 'default'}); "
                              f"expected layout:\n{self.layout}")
        keys = [s.key for s in samples]
        duplicates = sorted({k for k, n in zip(keys, keys[1:]) if k == n})
        if duplicates:
            raise SourceError(f"{self.name}: duplicate sample keys under {root}: {duplicates[:5]}")
        return samples


SOURCES: dict[str, Source] = {
    "sceneflow": Source("sceneflow", sceneflow.list_samples, sceneflow.LAYOUT),
    "fsd": Source("fsd", fsd.list_samples, fsd.LAYOUT),
    "kitti12": Source("kitti12", kitti.list_kitti12, kitti.LAYOUT_2012),
    "kitti15": Source("kitti15", kitti.list_kitti15, kitti.LAYOUT_2015),
    "middlebury2014": Source("middlebury2014", middlebury.list_middlebury2014, middlebury.LAYOUT_2014),
    "middeval3": Source("middeval3", middlebury.list_middeval3, middlebury.LAYOUT_EVAL3),
    "eth3d": Source("eth3d", eth3d.list_samples, eth3d.LAYOUT),
    "sintel": Source("sintel", sintel.list_samples, sintel.LAYOUT),
    "crestereo": Source("crestereo", crestereo.list_samples, crestereo.LAYOUT),
    "fallingthings": Source("fallingthings", fallingthings.list_samples, fallingthings.LAYOUT),
    "instereo2k": Source("instereo2k", instereo2k.list_samples, instereo2k.LAYOUT),
    "vkitti2": Source("vkitti2", vkitti2.list_samples, vkitti2.LAYOUT),
    "generic": Source("generic", generic.list_samples, generic.LAYOUT),
}


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise SourceError(f"unknown data set {name!r}; known: {', '.join(SOURCES)}")
    return SOURCES[name]


def parse_options(pairs: list[str]) -> dict[str, str]:
    """['split=test', 'passes=final'] -> {'split': 'test', 'passes': 'final'} (the CLI's --option values)."""
    options = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SourceError(f"option {pair!r}: expected NAME=VALUE")
        options[name.strip()] = value.strip()
    return options
