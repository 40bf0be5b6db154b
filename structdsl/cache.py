"""The compile cache, and pickling by reference (docs/design.md §4.2.2).

``structdsl.compile(spec, backend, **params)`` returns the same :class:`Program` for equal
arguments: compiling (parsing aside, which :class:`~structdsl.dsl.Spec` caches itself) means
type-checking, lowering, loading generated code, and each program then specialises itself
per atom shape (:meth:`Program.instance`, cached on the program) and builds its numba twin
and device tensors once.  A :class:`~structdsl.torch.RaceDistribution` built from a spec
every step therefore costs what one built from a compiled program costs.

**The one cache.**  A process-wide LRU of at most :data:`MAXSIZE` programs, keyed by

* the spec's identity (``id``; the entry holds the spec, so the id cannot be reused while
  the entry lives) and a hash of its source text,
* the backend's name,
* the parameter values after the spec's defaults are filled in: ints by value, data
  parameters (int/bool arrays, lists, tuples) by content: dtype, shape and a hash of the bytes.

Arguments the program would refuse (a float, a bool, an array of floats) bypass the cache,
so the program raises as before; a failed compile is never cached.  The bound matters
because a program holds generated code, device tensors and CUDA graphs: entries past the
bound are dropped least recently used first (a caller that holds a program keeps it; a later
``compile`` builds an equal one).  A spec cannot be a weak key here, since every program
refers to its spec.  ``cache_clear()`` empties it (tests that monkeypatch the compiler use
it); ``cache_info()`` reports hits, misses and the size.

A program is shared by every caller that compiles the same arguments: treat it as immutable
(``copy.copy(prog)`` gives a private shallow copy whose attributes, e.g. ``cuda_graphs``,
may be set on their own).

**Pickling.**  A spec pickles by reference: its module and qualified name when importing
them gives back the very same object (the built-in specs, any spec at the top level of an
importable module), else (a spec defined in ``__main__``, a notebook cell or a function) by
its source text, its file and first line, ``nested``, the parameters' defaults and the plain
constants it reads from outside.  Loading such a spec parses and verifies the text like any
spec (a ``def`` is compiled so that the frontend can find its lines, and never called; its
decorators, defaults and annotations are not evaluated); the file's other lines are not
needed.  (Unpickling is as trusting as ``pickle`` itself: load only what you trust.)  Equal
source specs load as one object per process (a weak table), and as the process's own spec
when it defines one of that name and source (a spawned worker re-runs the parent's
``__main__`` top level), so their programs are shared too.  A ``reference=`` solver travels
with a source spec only when it is importable by reference itself.  A program pickles as
``(spec, backend name, parameter values)`` and is rebuilt through this cache on load (numba's
on-disk cache makes that fast in a fresh process); ``copy.deepcopy`` of a spec or a program
returns the object itself, as for functions and classes.  A backend registered with
``structdsl.backends.register`` must be registered in the loading process too.
"""
from __future__ import annotations

import ast
import builtins
import collections
import hashlib
import importlib
import inspect
import linecache
import sys
import threading
import weakref

import numpy as np

__all__ = ["MAXSIZE", "compile_cached", "cache_clear", "cache_info", "CacheInfo"]

#: Most programs the cache holds (least recently used dropped first).
MAXSIZE = 64

CacheInfo = collections.namedtuple("CacheInfo", "hits misses maxsize currsize")

_lock = threading.RLock()
_programs = collections.OrderedDict()        # key -> (spec, program)
_stats = {"hits": 0, "misses": 0}
_source_specs = weakref.WeakValueDictionary()  # source key -> Spec rebuilt from (or pickled as) source


def compile_cached(spec, backend, params, build):
    """The program of ``spec`` for ``backend`` with ``params``: from the cache, or
    ``build()`` (which constructs it) stored there.  ``spec.ir`` must have been verified."""
    key = _key(spec, backend, params)
    if key is None:                   # a value the program refuses: let it raise
        return build()
    with _lock:
        hit = _programs.get(key)
        if hit is not None:
            _programs.move_to_end(key)
            _stats["hits"] += 1
            return hit[1]
        _stats["misses"] += 1
        program = build()             # under the lock: equal concurrent calls compile once
        _programs[key] = (spec, program)
        while len(_programs) > max(int(MAXSIZE), 0):
            _programs.popitem(last=False)
        return program


def cache_clear():
    """Empty the compile cache (and the table of specs rebuilt from source); reset the counts."""
    with _lock:
        _programs.clear()
        _source_specs.clear()
        _stats.update(hits=0, misses=0)


def cache_info():
    """:data:`CacheInfo` ``(hits, misses, maxsize, currsize)``."""
    with _lock:
        return CacheInfo(_stats["hits"], _stats["misses"], MAXSIZE, len(_programs))


def _key(spec, backend, params):
    p = spec.ir
    values = {**{k: v for k, v in p.defaults.items() if k in p.statics}, **params}
    items = []
    for name in sorted(values):
        v = values[name]
        if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
            items.append((name, int(v)))
        elif isinstance(v, (np.ndarray, list, tuple)):
            try:
                a = np.asarray(v)
            except (TypeError, ValueError):
                return None
            if a.dtype.kind not in "biu":
                return None
            a = np.ascontiguousarray(a)
            items.append((name, a.dtype.str, a.shape, hashlib.sha256(a.tobytes()).hexdigest()))
        else:
            return None
    return (id(spec), source_hash(spec), str(backend), tuple(items))


# ---- specs: source, hash, pickling ------------------------------------------------------------
def spec_source(spec):
    """``(file, first line, text)`` of ``spec``'s definition (decorators included), read once."""
    got = spec.__dict__.get("_source")
    if got is None:
        fn = inspect.unwrap(spec.fn)
        file = inspect.getsourcefile(fn) or fn.__code__.co_filename
        lines, first = inspect.getsourcelines(fn)
        got = spec.__dict__["_source"] = (file, first, "".join(lines))
    return got


def source_hash(spec):
    """A hash of ``spec``'s source text (its bytecode when the source cannot be read)."""
    h = spec.__dict__.get("_source_hash")
    if h is None:
        try:
            data = spec_source(spec)[2].encode()
        except (OSError, TypeError):
            data = spec.fn.__code__.co_code
        h = spec.__dict__["_source_hash"] = hashlib.sha256(data).hexdigest()
    return h


def reduce_spec(spec):
    """``__reduce__`` of a :class:`~structdsl.dsl.Spec`: by module and qualified name when
    that finds this very object, else by source (see the module docstring)."""
    module, qualname = getattr(spec, "__module__", None), getattr(spec, "__qualname__", spec.name)
    if module not in (None, "__main__") and _lookup(module, qualname) is spec:
        return spec_by_reference, (module, qualname)
    try:
        file, first, text = spec_source(spec)
    except (OSError, TypeError) as exc:
        import pickle
        raise pickle.PicklingError(f"cannot pickle spec {spec.name!r}: it is not importable as "
                                   f"{module}.{qualname} and its source cannot be read ({exc})") from None
    fn = inspect.unwrap(spec.fn)
    reference = spec.reference if spec.reference is not None and _importable(spec.reference) else None
    state = dict(name=spec.name, module=module, qualname=qualname, file=file, first=first, text=text,
                 constants=_outer_constants(fn, text), defaults=fn.__defaults__, nested=spec.nested,
                 reference=reference)
    with _lock:
        _source_specs.setdefault(_source_key(state), spec)   # unpickled here: this very object
    return spec_from_source, (state,)


def spec_by_reference(module, qualname):
    """Unpickle a spec pickled by reference (imports its module)."""
    return _lookup(module, qualname, importing=True)


def spec_from_source(state):
    """Unpickle a spec pickled by source: the same object for equal sources in one process."""
    key = _source_key(state)
    with _lock:
        spec = _source_specs.get(key)
        if spec is None:
            spec = _defined_here(state) or _rebuild_spec(state, key)
            _source_specs[key] = spec
    return spec


def _defined_here(state):
    """The loading process's own spec of that name and source, if it has one: a spawned
    worker re-runs the top level of the parent's ``__main__`` file, which defines its specs
    again (the worker then compiles each once)."""
    from .dsl import Spec
    try:
        spec = _lookup(state["module"], state["qualname"])
        if not isinstance(spec, Spec) or spec.nested != state["nested"] \
                or spec_source(spec)[1:] != (state["first"], state["text"]):
            return None
        fn = inspect.unwrap(spec.fn)
        if fn.__defaults__ == state["defaults"] and _outer_constants(fn, state["text"]) == state["constants"]:
            return spec
    except (OSError, TypeError, AttributeError):
        pass
    return None


def _lookup(module, qualname, importing=False):
    mod = importlib.import_module(module) if importing else sys.modules.get(module)
    obj = mod
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            if importing:
                raise AttributeError(f"module {module!r} has no spec {qualname!r}")
            return None
    return obj


def _importable(fn):
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    return module not in (None, "__main__") and "<" not in qualname and _lookup(module, qualname) is fn


def _outer_constants(fn, text):
    """The plain constants (ints, bools, rectangular tuples of them) among the names the
    spec's text reads from outside it: all a spec may read from its module or closure."""
    from .frontend import _dedent
    from .frontend_names import is_plain_constant, outer_names
    outer = outer_names(fn)
    tree = ast.parse(_dedent(text.splitlines(keepends=True)))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return {k: outer[k] for k in sorted(names) if k in outer and is_plain_constant(outer[k])
            and getattr(builtins, k, None) is not outer[k]}


def _source_key(state):
    parts = (state["name"], state["module"], state["qualname"], state["file"], state["first"], state["text"],
             repr(sorted(state["constants"].items())), repr(state["defaults"]), state["nested"],
             _name_of(state["reference"]))
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _name_of(fn):
    return None if fn is None else (fn.__module__, fn.__qualname__)


def _rebuild_spec(state, key):
    """A spec from its pickled source: the text is registered with ``linecache`` under a
    file name of its own (its lines at their original numbers, so errors name the user's
    lines), and a ``def`` of the same name is compiled there, never called: the frontend
    reads the spec from the text, its outer constants from the function's globals."""
    from .dsl import Spec
    from .frontend import _dedent
    name, first, text = state["name"], state["first"], state["text"]
    file = f"<structdsl spec {state['qualname']} from {state['file']} #{key[:12]}>"
    padded = "\n" * (first - 1) + text
    lines = padded.splitlines(keepends=True)
    linecache.cache[file] = (len(padded), None, lines, file)      # mtime None: never checked on disk
    tree = ast.parse(_dedent(text.splitlines(keepends=True)))
    fdef = tree.body[0]
    if not isinstance(fdef, ast.FunctionDef) or fdef.name != name:
        raise ValueError(f"the pickled source of spec {name!r} is not its def")
    # only the def's position and name matter: no decorator, default or annotation runs
    fdef.decorator_list, fdef.returns = [], None
    fdef.args.defaults = [ast.Constant(None) for _ in fdef.args.defaults]
    for a in fdef.args.args:
        a.annotation = None
    ast.increment_lineno(tree, first - 1)
    ast.fix_missing_locations(tree)
    namespace = {"__builtins__": builtins, "__name__": state["module"] or "__main__", **state["constants"]}
    exec(builtins.compile(tree, file, "exec"), namespace)          # defines the function only
    fn = namespace[name]
    fn.__defaults__ = state["defaults"]
    fn.__qualname__ = state["qualname"]
    spec = Spec(fn, nested=state["nested"], reference=state["reference"])
    # pickled again, it is the same source: the same key, hence this object in any process
    spec.__dict__["_source"] = (state["file"], first, text)
    return spec


# ---- programs ----------------------------------------------------------------------------------
def program_by_reference(spec, backend, params):
    """Unpickle a program: compile it again, through the cache."""
    from . import compile as compile_spec
    return compile_spec(spec, backend=backend, **params)
