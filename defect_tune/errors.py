"""The one error type for bad input, which the command line turns into one line and exit 2."""


class UserError(ValueError):
    """A file, option or value that cannot be used; the message names it and says why.

    Every stage's own error (`PrepareError`, `ConfigError`, `DataError`, ...) is one of these, and
    the command line catches them once, at its edge. Any other exception is a fault of ours and
    keeps its traceback. A ValueError so that library callers who caught ValueError still do.
    """
