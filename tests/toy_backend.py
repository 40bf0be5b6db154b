"""A test-only backend, written by following docs/design.md §4.7 ("Adding a backend").

It implements the backend contract of :mod:`structdsl.program` and nothing else: solving and
replaying go to the NumPy reference through its own contract methods, and a nested spec
with plain races reports its member sets in the second compact form, as exit races
(:class:`structdsl.races.ExitRaces`), so that form of :mod:`structdsl.races` runs against
the reference in every conformance test (``conformance.BACKENDS`` includes ``"toy"``).
"""
import structdsl
from structdsl import ir, races
from structdsl.program import Program as _BaseProgram, Replay


class Program(_BaseProgram):
    backend = "toy"

    def __init__(self, spec, **static_params):
        super().__init__(spec, **static_params)
        self.reference = structdsl.compile(spec, backend="numpy", **static_params)
        plain = not any(isinstance(s, ir.GroupRace) for s in ir.walk_statements(self.ir.body))
        self.exit_races = self.ir.nested and plain

    def _reference_instance(self, inst):
        return self.reference.instance(inst.atom_shape)

    def solve_flat(self, inst, weights, log_space):
        return self.reference.solve_flat(self._reference_instance(inst), weights, log_space)

    def replay_flat(self, inst, traces, logits):
        rep = self.reference.replay_flat(self._reference_instance(inst), traces, logits)
        if not self.exit_races:
            return rep
        # nested plain races shrink: an atom ran in races 0 .. its last one
        return Replay(rep.possible, races.ExitRaces.from_members(rep.races.members))
