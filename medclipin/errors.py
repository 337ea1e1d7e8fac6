"""The one base class of the errors a user can fix: bad input, a missing file, a wrong setting.

Every module raises its own subclass (``ManifestError``, ``ConfigError``, ...) with a message that names
the file or field and what is wrong. The ``medclipin`` command prints that message and exits with 2,
in one place (``medclipin.cli.main``), instead of each command catching each kind.
"""


class MedclipinError(Exception):
    """A problem with the user's input or settings; its message says which file or field and why."""
