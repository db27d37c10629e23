"""The one exception type users see for bad input (docs/design.md §5).

It subclasses ValueError so callers that already catch ValueError keep working; the CLI
prints its message without a traceback and exits with status 2.
"""


class ProReflowError(ValueError):
    """Bad configuration, data, shapes, window boundaries, weights or checkpoints."""
