"""User-facing errors: anything a user can fix (bad config, bad path, bad input).

The CLI turns a UserError into a one-line message on stderr and exit code 2;
everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with what the user asked for, reported as one line, exit code 2."""

    exit_code = 2
