"""The one error a user's bad setting raises, in every package."""


class ConfigError(ValueError):
    """A bad user setting. Scripts print it as one line (naming the value and the fix), exit 2."""
