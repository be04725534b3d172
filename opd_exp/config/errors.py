"""The one error a bad config raises."""


class ConfigError(ValueError):
    """A config value that is not allowed; the message is one line naming the field."""
