"""Exceptions raised by structdsl.

Compile-time problems (a spec outside the DSL, or one that could break the stochastic
invariant, or whose shapes do not agree) raise :class:`SpecError`, whose message starts with
``file:line`` of the user's own source.  Problems found while a compiled spec runs raise
:class:`RaceError` subclasses; they name the spec line and the batch element (``lane``) where
it happened.  Bad arguments (shapes, NaN logits, malformed traces) raise plain
``ValueError``/``TypeError``.
"""


class SpecError(Exception):
    """A spec is outside the DSL or could leak noise; carries the user's file and line."""

    def __init__(self, message, file=None, line=None):
        self.file, self.line, self.reason = file, line, message
        where = f"{file}:{line}: " if file is not None and line is not None else ""
        super().__init__(where + message)


class RaceError(RuntimeError):
    """Something went wrong while a compiled spec ran.

    ``file``/``line``: the spec line; ``lane``: the batch element (a tuple index into the
    batch shape), when known.  The message names both.
    """

    def __init__(self, message, file=None, line=None, lane=None):
        self.reason, self.file, self.line, self.lane = message, file, line, lane
        super().__init__(self._text())

    def _text(self):
        where = f"{self.file}:{self.line}: " if self.file is not None and self.line is not None else ""
        lane = f" (batch element {self.lane})" if self.lane is not None else ""
        return where + self.reason + lane

    def locate(self, file=None, line=None, lane=None):
        """Fill in the spec line and the batch element where they are not known yet."""
        if self.line is None and line is not None:
            self.file, self.line = file, line
        if self.lane is None and lane is not None:
            self.lane = lane
        self.args = (self._text(),)
        return self


class EmptyRaceError(RaceError):
    """A race had no live member: every candidate was retired, invalid or at logit -inf."""


class NestingError(RaceError):
    """A spec declared ``nested=True`` but a race was not inside the previous one."""


class SpecIndexError(RaceError, IndexError):
    """An index was negative or past the end of its dimension (no wrap-around in the DSL)."""


class SpecZeroDivisionError(RaceError, ZeroDivisionError):
    """Integer division or modulo by zero inside a spec."""


class SpecOverflowError(RaceError, OverflowError):
    """An int64 result overflowed inside a spec."""


class SpecValueError(RaceError, ValueError):
    """A run-time value outside its domain (a reduction of an empty array, a group key out
    of range, a predicate of the wrong type)."""


class EnumerationLimitError(RuntimeError):
    """Exact enumeration would produce more traces than the size guard allows."""
