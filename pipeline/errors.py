"""Errors whose messages tell the user what to do; the CLI prints them without a traceback."""


class UserFacingError(RuntimeError):
    pass
