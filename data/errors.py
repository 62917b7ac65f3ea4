"""The one exception type of `hymoe.data`, so the CLI can catch it and print the message as is."""


class DataError(ValueError):
    """A problem with input files, a prepared directory or a loader argument.

    The message names the file (and line, shard or field) and says what to change.
    """
