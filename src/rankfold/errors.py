"""The one exception type that rankfold raises for bad input."""


class RankfoldError(ValueError):
    """Bad input or an unsupported model: the message names the problem in one line."""
