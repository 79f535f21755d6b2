"""The two kinds of failure every pisnoop command maps to an exit code.

Domain code raises its own exceptions (``ConfigError``, ``PcapError``,
``StoreUnavailable``, ...) and derives them from one of these, so that the
command line (``appliance.cli.main``, the one place that picks exit codes)
can tell a mistake the user can fix from a failure at run time without
importing every package. Nothing here imports anything.
"""


class BadInput(Exception):
    """A config, argument, file or environment the user can fix: exit 2, one line."""


class Failure(Exception):
    """The command could not do its job (a store away, a write that failed): exit 1, one line."""


class UsageError(BadInput):
    """A bad command-line argument, raised by the command functions themselves."""
