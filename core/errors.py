"""One exception type for every user-facing mistake (bad config, budget too small, missing files).

The CLI turns it into a one-line message and exit code 2; anything else is a bug and keeps its traceback.
"""


class SuperweightsError(ValueError):
    """A problem the user can fix; its message is a complete, single-line explanation."""


class BudgetTooSmallError(SuperweightsError):
    """The budget is below one parameter per block; `minimum` is the smallest valid budget."""

    def __init__(self, message: str, minimum: int):
        super().__init__(message)
        self.minimum = minimum
