"""The one kind of user error: bad input that deserves a one-line message, not a traceback."""


class UserError(Exception):
    """Bad input (unknown name, missing file, incompatible models...). The message names the problem and the fix.

    The runner catches it, prints ``error: <message>`` on one line and exits with status 2. Anything else is a bug
    and keeps its traceback.
    """
