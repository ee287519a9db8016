"""The error a command reports as one line: bad input from the user.

:class:`UsageError` (and its subclasses, e.g. :class:`bench.t2i.outdir.OutputError`) is what
:func:`bench.t2i.cli.run_command` and the trainer turn into one ``error:`` line and exit code
2. Library code raises it for what the user gave (a flag, a file, a folder), so that any
other exception, a plain ``ValueError`` from a bug included, keeps its traceback. It imports
nothing, so every module of the library can raise it.
"""


class UsageError(ValueError):
    """Bad input from the user: reported as one ``error:`` line and exit code 2."""
