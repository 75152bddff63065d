"""The exception types the command-line tools turn into a clean message and a non-zero exit (a low module:
run-directory code raises them without importing the config schemas)."""


class UserError(Exception):
    """Bad input: a config value, a file, a directory. The message says what is wrong and what is allowed."""


class ConfigError(UserError, ValueError):
    """A config value that is not allowed; the message names the field, the value and what is allowed."""
