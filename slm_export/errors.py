"""Errors a user can act on.

Anything raised as `SlmExportError` is printed by the CLI as one line and exits with `exit_code`
(2 = bad input), never as a traceback. Raise it for every input the user can fix.
"""


class SlmExportError(Exception):
    """Bad input or an unmet requirement the user can fix. CLI exit code 2."""

    exit_code = 2


class ParityFailure(SlmExportError):
    """An artifact ran but drifted from PyTorch beyond its tolerance. CLI exit code 1."""

    exit_code = 1


class OutOfMemory(SlmExportError):
    """An export ran out of memory mid-way (a MemoryError, a failed allocation or mapping). CLI exit
    code 3: not bad input (a refusal before anything ran is exit 2), a run that could not finish."""

    exit_code = 3


class RuntimeUnavailable(SlmExportError):
    """The runtime cannot execute on this machine (Core ML off macOS). CLI exit code 4."""

    exit_code = 4
