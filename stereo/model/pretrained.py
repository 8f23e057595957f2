"""Starting points: load released backbone weights into the feature side, with an explicit key mapping.

`WeightMismatchError` is the one error for any weight file that does not fit a module; it lists every missing,
unexpected and wrong-shaped key by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class WeightMismatchError(ValueError):
    """A weight file does not fit the module it is loaded into. Keys are named in the module's own layout."""

    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # key, file, model

    def __post_init__(self) -> None:
        super().__init__(self.render())

    def render(self, limit: int = 20) -> str:
        def listed(items: list[str]) -> str:
            more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
            return ", ".join(items[:limit]) + more

        parts = [f"{self.source}: the weights do not fit the model"]
        if self.missing:
            parts.append(f"missing {len(self.missing)}: {listed(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)}: {listed(self.unexpected)}")
        if self.wrong_shape:
            shapes = [f"{k} (file {list(f)}, model {list(m)})" for k, f, m in self.wrong_shape]
            parts.append(f"wrong shape {len(shapes)}: {listed(shapes)}")
        return "; ".join(parts)

    def __str__(self) -> str:
        return self.render()
