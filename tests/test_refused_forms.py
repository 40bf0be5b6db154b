"""The verifier refuses each form below, and says so at the offending line of this file.

Every bad spec marks its offending line with ``# BAD``; ``structdsl.compile`` must raise
:class:`structdsl.SpecError` whose ``.file`` is this file and whose ``.line`` is exactly
that line.  The forms pinned here: ``race`` with ``members=`` as a keyword, ``range`` with
more than one argument, and slices with a step or bounds (shapes or strides that could
depend on state, e.g. on a race's winner).
"""
import inspect
import os

import pytest

import structdsl
from conformance import assert_refused_everywhere
from structdsl import SpecError, arange, atoms, race, spec, where, zeros


def bad_line(s):
    """The absolute line number of the single ``# BAD`` line in spec ``s``'s source."""
    lines, first = inspect.getsourcelines(s.fn)
    hits = [first + i for i, text in enumerate(lines) if "# BAD" in text]
    assert len(hits) == 1, f"spec {s.name} must mark exactly one line with # BAD"
    return hits[0]


def assert_rejected_at_bad_line(s):
    err = assert_refused_everywhere(s)
    assert err.file is not None and os.path.samefile(err.file, __file__), err.file
    assert err.line == bad_line(s), f"{err} (expected line {bad_line(s)})"
    assert err.reason
    return err


# ---- race(noise, members=...) ---------------------------------------------------------
@spec
def members_keyword_lambda(n):
    item = atoms(n)
    w = race(item, members=lambda i: i < 2)  # BAD
    return w


@spec
def members_keyword_mask(n):
    item = atoms(n)
    even = arange(n) % 2 == 0
    w = race(item, members=even)  # BAD
    return w


# ---- range with two (or three) arguments -------------------------------------------------
@spec
def range_start_stop(n):
    item = atoms(n)
    x = zeros(n, int)
    for i in range(1, n):  # BAD
        x[i] = 1
    w = race(item)
    return w, x


@spec
def range_start_stop_step(n):
    item = atoms(n)
    x = zeros(n, int)
    for i in range(0, n, 2):  # BAD
        x[i] = 1
    w = race(item)
    return w, x


# ---- slices with a step or bounds -----------------------------------------------------------
@spec
def slice_step_from_winner(n):
    item = atoms(n)
    z = arange(n)
    w = race(item)
    y = z[::w]  # BAD
    return y


@spec
def slice_lower_bound(n):
    item = atoms(n)
    z = zeros(n, int)
    y = z[1:]  # BAD
    w = race(item)
    return w, y


@spec
def slice_upper_bound_from_winner(n):
    item = atoms(n)
    z = arange(n)
    w = race(item)
    y = z[:w]  # BAD
    return y


@spec
def slice_bounds_in_2d_index(n):
    item = atoms(n)
    z = zeros((n, n), int)
    y = z[0, 1:n]  # BAD
    w = race(item)
    return w, y


@spec
def slice_step_on_continuation_line(n):
    item = atoms(n)
    z = arange(n)
    w = race(item)
    y = where(z > 0,
              z[::w],  # BAD
              z)
    return y


REFUSED = [
    pytest.param(members_keyword_lambda, id="race-members-keyword-lambda"),
    pytest.param(members_keyword_mask, id="race-members-keyword-mask"),
    pytest.param(range_start_stop, id="range-two-args"),
    pytest.param(range_start_stop_step, id="range-three-args"),
    pytest.param(slice_step_from_winner, id="slice-step-from-winner"),
    pytest.param(slice_lower_bound, id="slice-lower-bound"),
    pytest.param(slice_upper_bound_from_winner, id="slice-upper-bound-from-winner"),
    pytest.param(slice_bounds_in_2d_index, id="slice-bounds-2d"),
    pytest.param(slice_step_on_continuation_line, id="slice-step-continuation-line"),
]


@pytest.mark.parametrize("bad", REFUSED)
def test_refused_form_names_its_line(bad):
    err = assert_rejected_at_bad_line(bad)
    assert str(err).startswith(f"{err.file}:{err.line}: ")


@spec
def positional_members_and_plain_slice(n):
    item = atoms(n)
    x = zeros(n, int)
    for j in range(n):
        x[j] = j
    w = race(item, lambda i: i < 2)
    y = x[:]
    return w, y


def test_the_allowed_neighbours_of_those_forms_compile():
    """The refusals are specific: positional members, one-argument range and a bare ``:``
    are fine, so the tests above fail for the form they name."""
    prog = structdsl.compile(positional_members_and_plain_slice)
    s = prog.sample([0.0, 0.0, 0.0, 0.0], sample_shape=(20,), seed=0)
    assert set(s.structure.w.tolist()) <= {0, 1}
    assert (s.structure.y == [0, 1, 2, 3]).all()
