"""The base of every error caused by the user's input (config, data, files).

The command line prints these as one line and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class UserError(ValueError):
    pass
