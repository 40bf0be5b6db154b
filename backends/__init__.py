"""Backends that lower a verified spec IR (:mod:`structdsl.ir`) to executable semantics.

Each backend module exposes a ``Program`` subclass of :class:`structdsl.program.Program`.
Backends are imported lazily, so the NumPy reference works with numpy alone.  No backend
knows any particular structure: they compile whatever spec they are given.
"""
import importlib
import importlib.util

_BACKENDS = {"numpy": "structdsl.backends.numpy_reference", "numba": "structdsl.backends.numba_backend",
             "torch": "structdsl.backends.torch_backend"}


def program_class(name):
    """The Program class of backend ``name`` (imported on first use)."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {sorted(_BACKENDS)}")
    if name == "numba" and importlib.util.find_spec("numba") is None:
        raise ImportError("backend 'numba' needs the numba package: pip install -e '.[numba]'")
    if name == "torch" and importlib.util.find_spec("torch") is None:
        raise ImportError("backend 'torch' needs the torch package: pip install -e '.[torch]'")
    return importlib.import_module(_BACKENDS[name]).Program


def register(name, module):
    """Make ``structdsl.compile(spec, backend=name)`` use the ``Program`` class of ``module``
    (an importable module name): how a backend outside this package joins (docs/design.md
    §4.7).  Registering a name twice with different modules is an error."""
    if _BACKENDS.get(name, module) != module:
        raise ValueError(f"backend {name!r} is already registered as {_BACKENDS[name]!r}")
    _BACKENDS[name] = module


def available():
    """Names of the registered backends."""
    return sorted(_BACKENDS)
