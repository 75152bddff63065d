"""The exception types the command-line tools turn into a clean message and a non-zero exit, and the two checks
that raise them from every layer (a low module: run-directory and tensor code raise them without importing the
config schemas)."""


class UserError(Exception):
    """Bad input: a config value, a file, a directory. The message says what is wrong and what is allowed."""


class ConfigError(UserError, ValueError):
    """A config value that is not allowed; the message names the field, the value and what is allowed."""


def check_allowed(path: str, value, allowed) -> None:
    """Fail unless `value` is one of `allowed`, naming the field, the value and the options."""
    if value not in allowed:
        raise ConfigError(f"{path}={value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")


def check_at_least(path: str, value, minimum, what: str = "") -> None:
    """Fail unless `value` >= `minimum`."""
    if value is None or value < minimum:
        raise ConfigError(f"{path}={value!r} must be >= {minimum}{what}")
