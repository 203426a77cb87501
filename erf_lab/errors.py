"""User-facing errors: the CLI prints their message as one line and exits with code 2."""


class ErfLabError(Exception):
    """A problem with the user's input (a file, a flag, a model) rather than a bug.

    The message must be one self-contained line that says what is wrong and, where
    possible, what to do about it.
    """
