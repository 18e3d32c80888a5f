"""The one exception type for bad input (files, fields, arguments)."""


class LadsError(ValueError):
    """Bad input. The message names the file, field or argument; the CLI prints it alone."""
