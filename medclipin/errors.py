"""The one base class of the errors a user can fix: bad input, a missing file, a wrong setting.

Every module raises its own subclass (``ManifestError``, ``ConfigError``, ...) with a message that names
the file or field and what is wrong. The ``medclipin`` command prints that message and exits with 2,
in one place (``medclipin.cli.main``), instead of each command catching each kind.
"""


class MedclipinError(Exception):
    """A problem with the user's input or settings; its message says which file or field and why."""


class SettingError(MedclipinError, ValueError):
    """A setting (a config key or an argument) has a value it cannot take; the message names it. A ValueError
    too, so code that caught the ValueError it used to be keeps working."""
