"""The one exception type the command-line tools turn into a clean message and a non-zero exit."""


class UserError(Exception):
    """Bad input: a config value, a file, a directory. The message says what is wrong and what is allowed."""
