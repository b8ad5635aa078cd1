"""User-facing errors: the CLI prints their message as one line instead of a traceback."""


class NoiseclsError(Exception):
    """A problem the user can fix (configuration, data, checkpoint); the message says how."""
