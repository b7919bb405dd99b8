"""One exception type for user-facing errors: the CLI prints its message and exits with code 2."""


class MitobenchError(Exception):
    """A problem with the user's input (data, config, weights) that the user can fix.

    The message names the file or value at fault and says what to do.
    """

    exit_code = 2


class FoldFailedError(MitobenchError):
    """One fold could not be trained (e.g. a NaN loss); the run goes on with the other folds."""
