"""The one exception type users see: a one-line message naming the file, key or value at fault."""


class SftlensError(Exception):
    """Bad input or state the user can fix; the CLI prints it as a single line, no traceback."""
