"""User-facing errors: the CLI prints their message (no traceback) and exits 2."""


class CompressError(Exception):
    """An error caused by user input or the environment, with a message that says what to do.

    The message speaks to a Python caller (``force=True``); where the command line spells the remedy
    its own way (``--force``), ``cli_message`` holds that wording, and the CLI prints it instead."""

    def __init__(self, message: str = "", *, cli_message: str | None = None):
        super().__init__(message)
        self.cli_message = cli_message


class RecipeError(CompressError, ValueError):
    """A recipe (or a config built in Python) that does not validate; the message names the YAML path
    of the problem. A ValueError too, as the pydantic error it replaces is."""


class FetchError(CompressError):
    """A package or model could not be fetched, assembled or verified."""
