"""User-facing errors: the CLI prints their message (no traceback) and exits 2."""


class CompressError(Exception):
    """An error caused by user input or the environment, with a message that says what to do."""


class RecipeError(CompressError):
    """A recipe that does not validate; the message names the YAML path of the problem."""


class FetchError(CompressError):
    """A package or model could not be fetched, assembled or verified."""
