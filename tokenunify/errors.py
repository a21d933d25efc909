"""The package's configuration error (a module of its own, so that every layer can raise it)."""


class ConfigError(ValueError):
    """A configuration problem; the message names the key, file or value at fault."""
