"""The one base class of the errors a user can fix: each says what is wrong in one line, and the command-line tools
print that line instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input, config or environment, phrased as one line."""
