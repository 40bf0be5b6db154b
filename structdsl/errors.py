"""Exceptions raised by structdsl.

Compile-time problems (a spec outside the DSL, or one that could break the stochastic
invariant) raise :class:`SpecError`, whose message starts with ``file:line`` of the user's
own source.  Run-time problems found while executing a spec raise :class:`RaceError`
subclasses, also naming the spec line of the race involved.  Bad arguments (shapes, NaN
logits, malformed traces) raise plain ``ValueError``/``TypeError``.
"""


class SpecError(Exception):
    """A spec is outside the DSL or could leak noise; carries the user's file and line."""

    def __init__(self, message, file=None, line=None):
        self.file, self.line, self.reason = file, line, message
        where = f"{file}:{line}: " if file is not None and line is not None else ""
        super().__init__(where + message)


class RaceError(RuntimeError):
    """A race went wrong while a compiled spec ran (names the spec line of the race)."""


class EmptyRaceError(RaceError):
    """A race had no live member: every candidate was retired, invalid or at logit -inf."""


class NestingError(RaceError):
    """A spec declared ``nested=True`` but a race was not inside the previous one."""


class EnumerationLimitError(RuntimeError):
    """Exact enumeration would produce more traces than the size guard allows."""
