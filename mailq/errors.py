"""Exceptions shared by every layer. Messages are for operators: what happened, where, what to run next."""


class MailqError(Exception):
    """A known failure with an operator-readable message (CLI exit code 1)."""


class TemporaryFailure(MailqError):
    """Try again later: disk full, filesystem unavailable, lock wait timed out (CLI 75, MTA pipe 75)."""


class NotFound(MailqError):
    """An unknown list, member, entry or held message."""


class InvalidInput(MailqError):
    """Input refused by validation; nothing was changed."""


class LeaseLost(MailqError):
    """This node may no longer act on its claims (fenced, or its slice taken over): stop, settle nothing."""
