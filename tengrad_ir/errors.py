"""The one domain exception family of tengrad (the IR defines it so it stays torch-free)."""


class TengradError(Exception):
    """Base class of every error tengrad raises."""


class SpecError(TengradError, ValueError):
    """A layer spec that contradicts itself: the message names the offending index or map."""
