"""Errors whose messages tell the user what to do; the CLI prints them without a traceback.

Each carries the exit status the CLI returns for it (the table is in the README and ``adapters --help``):

    UserFacingError   1   a stage could not do its work (storage, pre-flight, a domain failed): the cause and the fix
    UsageError        2   what was asked cannot start as asked (no prepared data yet, a domain no source provides):
                          nothing ran; the message names the fix
"""


class UserFacingError(RuntimeError):
    exit_code = 1


class UsageError(UserFacingError):
    exit_code = 2
