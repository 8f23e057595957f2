"""The one error type for configuration problems: it names the file, the key and what was expected."""


class ConfigError(ValueError):
    exit_code = 2

    def __init__(self, key: str, expected: str, *, source: str | None = None, hint: str | None = None):
        self.key, self.expected, self.source, self.hint = key, expected, source, hint
        super().__init__(self.render())

    def render(self) -> str:
        where = f"{self.source}: " if self.source else ""
        hint = f"; did you mean {self.hint}?" if self.hint else ""
        return f"{where}{self.key}: {self.expected}{hint}"

    def with_source(self, source: str) -> "ConfigError":
        if self.source is None:
            self.source = source
            self.args = (self.render(),)
        return self
