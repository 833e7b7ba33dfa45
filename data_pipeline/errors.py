"""The data pipeline's error: what the user must fix in the data config or the data (it names both)."""


class DataError(ValueError):
    """A source cannot be read at all (missing files, unknown format, no documents)."""
