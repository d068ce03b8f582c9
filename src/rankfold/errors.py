"""The one exception type that rankfold raises for bad input."""


class RankfoldError(ValueError):
    """Bad input or an unsupported model: the message names the problem in one line."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type when it has none): what a one-line
    error quotes of a library's multi-line message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
