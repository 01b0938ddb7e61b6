"""One exception type for bad input of any kind, so every entry point reports it the same way.

`DistmlError` carries a message that names what was wrong and what is expected; the CLI
prints it as one line and exits with status 2, the HTTP layers answer it with 400.
"""


class DistmlError(Exception):
    """Bad input or an unusable environment, described for the user in one message."""
