"""The base of every error caused by the user's input (config, data, files).

The command line prints these as one line and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class UserError(ValueError):
    pass


class Preempted(Exception):
    """A preemption signal arrived; a checkpoint was saved. The process exits with exit_code
    (configurable) so that a launcher can requeue the job."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
