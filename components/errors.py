"""Errors a user can cause and fix. The CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input, bad params or an unreachable service.

    The message must name the file, field or URL at fault and say what to do about it.
    """
