"""The one exception type for problems a user can fix (bad input, missing files, mismatched models)."""


class DDTreeError(Exception):
    """Raised for user-facing errors; the command line prints its message on one line and exits non-zero."""
