"""User-facing errors: the CLI prints their message as one line and exits with code 2."""


class ErfLabError(Exception):
    """A problem with the user's input (a file, a flag, a model) rather than a bug.

    The message must be one self-contained line that says what is wrong and, where
    possible, what to do about it.
    """


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of an exception from a user's model (for a one-line error)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
