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
import io
import pickle

# scikit-learn 1.5 to 1.8 wheels pickle their Cython loss classes under the bare
# module name `_loss` (plain pickle finds them because importing sklearn puts
# `_loss` in sys.modules). Map them to where they live, so that nothing is ever
# imported from a top-level module named `_loss`, which any package could ship.
ALIASES = {"_loss": "sklearn._loss._loss"}


class RefusedGlobal(pickle.UnpicklingError):
    pass


_allowed = None  # frozenset of (module, name) while restricted() is active
_originals = (pickle._Unpickler.find_class, pickle.Unpickler, pickle.load, pickle.loads)
_pure_find_class = _originals[0]


def _check(module, name):
    if _allowed is None:
        raise RefusedGlobal("the restricted loader was not configured; nothing may be imported")
    if (module, name) not in _allowed:
        raise RefusedGlobal(
            f"the model file imports {module}.{name}, which ServeML did not check and allow; "
            "nothing was imported"
        )
    return ALIASES.get(module, module)


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return super().find_class(_check(module, name), name)


def _restricted_pure_find_class(self, module, name):
    return _pure_find_class(self, _check(module, name), name)


def _load(file, *, fix_imports=True, encoding="ASCII", errors="strict", buffers=None):
    return RestrictedUnpickler(file, fix_imports=fix_imports, encoding=encoding, errors=errors,
                               buffers=buffers).load()


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
        yield
    finally:
        _allowed = None
        pickle._Unpickler.find_class, pickle.Unpickler, pickle.load, pickle.loads = _originals


def load(path, fmt, allowed_globals):
    """The estimator in `path` (format pickle, joblib or skops), importing only `allowed_globals`."""
    with restricted(allowed_globals):
        return _load_file(path, fmt)


def _load_file(path, fmt):
    if fmt == "skops":
        try:
            import skops.io
        except ImportError:
            raise RuntimeError(
                "skops is not installed in this model's environment: add skops==<version> to requirements.txt"
            ) from None
        # skops builds objects itself (no pickle): it refuses any type not in `trusted`.
        return skops.io.load(path, trusted=sorted(f"{module}.{name}" for module, name in _allowed))
    if fmt == "joblib":
        import joblib

        return joblib.load(path)  # no mmap_mode: nothing in the file names another path
    with open(path, "rb") as handle:
        return RestrictedUnpickler(handle).load()
