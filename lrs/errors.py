"""Error types raised by lrs."""


class FitError(RuntimeError):
    """A fit produced non-finite values; the message names the iteration."""
