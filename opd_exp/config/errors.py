"""The errors a user sees as one line (the CLI prints them without a traceback)."""


class ConfigError(ValueError):
    """A config value that is not allowed; the message is one line naming the field."""


class RunStopped(RuntimeError):
    """The run cannot go on (e.g. gradients not finite step after step); says why in one line."""
