"""The project's own error types. The CLI prints these as one line naming the file and the problem;
anything else is a bug and keeps its traceback."""


class FlashlmError(Exception):
    """Base class of every error flashlm raises on purpose (bad input, a budget that cannot fit)."""
