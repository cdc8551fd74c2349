"""Load a model file importing only the globals ServeML checked: the restricted loader.

Runs inside the model's own environment (stdlib only here; joblib and skops are
imported from the environment when the format needs them), in the validate
probe, the runtime's model processes and the Lambda image alike.

ServeML's static scan lists every (module, name) a file would import and checks
them against the reviewed allowlist. This module is the second, independent
gate: the unpickler resolves exactly those pairs and refuses anything else, so
a file that fooled the scan (a byte stream that the scan and joblib read
differently, say) still imports nothing it was not allowed. While a model
loads, every unpickling path of the process is locked: the C and the
pure-Python unpickler and `pickle.load(s)`, which joblib and numpy call.
"""

import contextlib
import importlib
import io
import pickle
import re
import sys
import zipfile
import zlib

# scikit-learn 1.5 to 1.8 wheels pickle their Cython loss classes under the bare
# module name `_loss` (plain pickle finds them because importing sklearn puts
# `_loss` in sys.modules). Map them to where they live, so that nothing is ever
# imported from a top-level module named `_loss`, which any package could ship.
ALIASES = {"_loss": "sklearn._loss._loss"}

# Allowed classes whose constructor reads a file by name (Booster(model_file=path)). A real
# pickle never calls them: it rebuilds them with __new__ and __setstate__. While a model loads,
# their __init__ refuses, so a file cannot call one with a path of its choosing.
CONSTRUCT_ONLY = {("xgboost.core", "Booster"), ("lightgbm.basic", "Booster")}


class RefusedGlobal(pickle.UnpicklingError):
    pass


_allowed = None  # frozenset of (module, name) while restricted() is active
_guarded = {}  # class -> its own __init__ (or _MISSING), for the CONSTRUCT_ONLY classes resolved so far
_MISSING = object()
_originals = (pickle._Unpickler.find_class, pickle.Unpickler, pickle.load, pickle.loads)
_pure_find_class = _originals[0]


def _check(module, name):
    if _allowed is None:
        raise RefusedGlobal("the restricted loader was not configured; nothing may be imported")
    if (module, name) not in _allowed:
        raise RefusedGlobal(
            f"the model file imports {module}.{name}, which ServeML did not check and allow; nothing was imported"
        )
    return ALIASES.get(module, module)


def _guard(found, module, name):
    if (module, name) in CONSTRUCT_ONLY and isinstance(found, type) and found not in _guarded:
        _guarded[found] = found.__dict__.get("__init__", _MISSING)

        def refuse(self, *args, **kwargs):
            raise RefusedGlobal(
                f"the model file calls {module}.{name}(...) while loading, which no saved "
                "model does (its constructor can read a file by name); nothing was loaded"
            )

        found.__init__ = refuse
    return found


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return _guard(super().find_class(_check(module, name), name), module, name)


def _restricted_pure_find_class(self, module, name):
    return _guard(_pure_find_class(self, _check(module, name), name), module, name)


def _unguard():
    for cls, init in _guarded.items():
        if init is _MISSING:
            del cls.__init__
        else:
            cls.__init__ = init
    _guarded.clear()


def _load(file, *, fix_imports=True, encoding="ASCII", errors="strict", buffers=None):
    return RestrictedUnpickler(file, fix_imports=fix_imports, encoding=encoding, errors=errors, buffers=buffers).load()


def _loads(data, /, *, fix_imports=True, encoding="ASCII", errors="strict", buffers=None):
    return _load(io.BytesIO(data), fix_imports=fix_imports, encoding=encoding, errors=errors, buffers=buffers)


@contextlib.contextmanager
def restricted(allowed_globals):
    """Inside, every unpickler in this process resolves only these (module, name) pairs.

    joblib's unpicklers subclass the pure-Python pickle._Unpickler; older joblib and
    numpy call pickle.load for object arrays; all of them go through here."""
    global _allowed
    _allowed = frozenset((str(module), str(name)) for module, name in allowed_globals)
    pickle._Unpickler.find_class = _restricted_pure_find_class
    pickle.Unpickler = RestrictedUnpickler
    pickle.load, pickle.loads = _load, _loads
    try:
        # skops builds its objects itself, never through find_class: guard these before it starts.
        for module, name in sorted(CONSTRUCT_ONLY & _allowed):
            _guard(getattr(importlib.import_module(module), name), module, name)
        yield
    finally:
        _allowed = None
        _unguard()
        pickle._Unpickler.find_class, pickle.Unpickler, pickle.load, pickle.loads = _originals


@contextlib.contextmanager
def _aliased_modules():
    """skops imports a type's module by the name the file gives (importlib.import_module("_loss")):
    while it loads, each aliased name is scikit-learn's own module, never a top-level one on sys.path."""
    saved = {}
    for alias, target in ALIASES.items():
        if any(module == alias for module, _ in _allowed):
            saved[alias] = sys.modules.get(alias)
            sys.modules[alias] = importlib.import_module(target)
    try:
        yield
    finally:
        for alias, previous in saved.items():
            if previous is None:
                sys.modules.pop(alias, None)
            else:
                sys.modules[alias] = previous


class VersionMismatch(RuntimeError):
    """The model's own packages cannot load it; the message says what to pin."""


def load(path, fmt, allowed_globals):
    """The estimator in `path` (format pickle, joblib or skops), importing only `allowed_globals`."""
    try:
        with restricted(allowed_globals):
            return _load_file(path, fmt)
    except RefusedGlobal:
        raise
    except Exception as exc:
        advice = pin_advice(path, exc)
        if advice:
            raise VersionMismatch(advice) from exc
        raise


def _load_file(path, fmt):
    if fmt == "skops":
        try:
            import skops.io
        except ImportError:
            raise RuntimeError(
                "skops is not installed in this model's environment: add skops==<version> to requirements.txt"
            ) from None
        # skops builds objects itself (no pickle): it refuses any type not in `trusted`.
        with _aliased_modules():
            return skops.io.load(path, trusted=sorted(f"{module}.{name}" for module, name in _allowed))
    if fmt == "joblib":
        import joblib

        return joblib.load(path)  # no mmap_mode: nothing in the file names another path
    with open(path, "rb") as handle:
        return RestrictedUnpickler(handle).load()


# ---------------------------------------------------------------- what to pin


def pin_advice(path, exc):
    """When the installed packages cannot load what another release saved: which version to pin, or ''."""
    detail = f"{type(exc).__name__}: {exc}"[:300]
    text = str(exc)
    if "numpy._core" in text and isinstance(exc, ImportError):
        return (
            f"The model was saved with numpy 2, and this environment has numpy 1, which cannot load it "
            f"({detail}). Pin numpy 2 in requirements.txt (numpy==2.x, with scikit-learn 1.4.2 or newer), "
            "or save the model again with numpy 1."
        )
    if "compiled using NumPy 1.x" in text or "numpy.core.multiarray failed to import" in text:
        return (
            f"This environment's packages were built for numpy 1 but numpy 2 was installed ({detail}). "
            "Pin numpy<2 in requirements.txt (numpy==1.26.4), as the model's scikit-learn needs."
        )
    try:
        import sklearn

        installed = sklearn.__version__
    except Exception:
        return ""
    saved = saved_sklearn_version(path)
    sklearn_error = isinstance(exc, (ImportError, AttributeError)) and "sklearn" in text
    if saved and saved != installed:
        return (
            f"The model was saved with scikit-learn {saved}, and scikit-learn {installed} installed here "
            f"cannot load it ({detail}). Pin scikit-learn=={saved} in requirements.txt."
        )
    if sklearn_error and not saved:
        return (
            f"The model refers to scikit-learn internals that scikit-learn {installed} does not have "
            f"({detail}). Pin in requirements.txt the scikit-learn version the model was trained with."
        )
    return ""


# The key, a memo opcode (protocol 4: MEMOIZE; 2 and 3: BINPUT, LONG_BINPUT), then the value's string opcode.
VERSION_IN_PICKLE = re.compile(
    rb"_sklearn_version(?:\x94|q.|r....)?(?:\x8c([\x01-\x40])|X([\x01-\x40])\x00\x00\x00)", re.DOTALL
)
VERSION_IN_SKOPS = re.compile(rb'"_sklearn_version":\s*\{[^}]*?"content":\s*"(?:\\")?([0-9][^"\\]{0,40})')


def saved_sklearn_version(path, limit=64 * 1024 * 1024):
    """The scikit-learn version the file records, read as bytes (never unpickled), or None."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
            handle.seek(0)
            if head.startswith(b"PK"):
                with zipfile.ZipFile(handle) as archive, archive.open("schema.json") as schema:
                    data = schema.read(limit)
                found = VERSION_IN_SKOPS.search(data)
                return found.group(1).decode() if found else None
            data = handle.read(limit)
        if data[:1] == b"\x78":  # joblib's zlib
            data = zlib.decompressobj().decompress(data, limit)
    except Exception:
        return None
    found = VERSION_IN_PICKLE.search(data)
    if not found:
        return None
    size = (found.group(1) or found.group(2))[0]
    start = found.end()
    try:
        return data[start : start + size].decode("ascii")
    except UnicodeDecodeError:
        return None
