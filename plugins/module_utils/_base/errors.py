# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""One base for every error whose message is written for the user, and one way to translate a library's errors.

Modules turn these into fail_json; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import inspect


class FleetbackupError(Exception):
    """A failure the user can act on; the message says what was wrong and what to do."""


class UserError(FleetbackupError):
    """Bad input, or a state of the VM or the files that the user must resolve."""


class LeftHeld(FleetbackupError):
    """A hold on the guest that could not be let go (its vCPUs paused, its file systems frozen): a failed start
    says so after everything else."""

    still = None  # what is still held, as in "the VM is still paused"


class TranslatedError(FleetbackupError):
    """A library's error, translated by an ErrorHandler; cause is the library's exception, to look at its kind."""

    def __init__(self, message, cause=None):
        super().__init__(message)
        self.cause = cause


class ErrorHandler:
    """Turns one library's exceptions into ours, with a message that names the action that failed.

    One subclass per library (QMP, libvirt, NBD), as amazon.aws's error handlers are: it says which exceptions it
    translates (library_errors), into which TranslatedError (error), and how
    the library's exception reads (detail). Use handles(action) as a decorator, or call(action, function, ...).
    The action may name the decorated function's arguments, as in "Reading checkpoint {name}".
    """

    library_errors = ()
    error = TranslatedError

    @classmethod
    def detail(cls, err):
        return str(err)

    @classmethod
    def failure(cls, action, err):
        """Our error for err, raised during action."""
        return cls.error("%s failed: %s" % (action, cls.detail(err)), err)

    @classmethod
    def handles(cls, action):
        """Decorator: the function's library errors become ours, naming action."""
        def decorate(function):
            signature = inspect.signature(function)

            @functools.wraps(function)
            def handled(*args, **kwargs):
                try:
                    return function(*args, **kwargs)
                except cls.library_errors as err:
                    bound = signature.bind(*args, **kwargs)
                    bound.apply_defaults()
                    raise cls.failure(action.format(**bound.arguments), err) from None
            return handled
        return decorate

    @classmethod
    def call(cls, action, function, *args, **kwargs):
        """function(*args, **kwargs), its library errors ours, naming action: one call of a function that does more."""
        try:
            return function(*args, **kwargs)
        except cls.library_errors as err:
            raise cls.failure(action, err) from None
