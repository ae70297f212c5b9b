"""The one base class of the errors a user can fix: each says what is wrong in one line, and the command-line tools
print that line instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input, config or environment, phrased as one line."""


def did_you_mean(word: str, options: list[str] | tuple[str, ...]) -> str:
    """A hint naming the options closest to a mistyped word (two at most), or "" when none is close."""
    import difflib

    close = difflib.get_close_matches(word, list(options), n=2, cutoff=0.75)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
