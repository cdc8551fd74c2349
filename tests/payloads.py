"""Hand-built hostile model files. Each would create CANARY if anything unpickled it."""

import io
import os
import pickle

import joblib

from deployments.allowlist import corpus


def _str(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def call(module: str, name: str, *args: str, via_memo: bool = False) -> bytes:
    """A protocol-4 pickle that imports module.name with STACK_GLOBAL and calls it with string args."""
    body = b""
    if via_memo:
        # Hide the operands behind the memo, as picklescan bypasses do.
        body += _str(module) + b"\x94" + _str(name) + b"\x94" + b"0" + b"0"  # MEMOIZE, POP
        body += b"h\x00" + b"h\x01"  # BINGET 0, BINGET 1
    else:
        body += _str(module) + _str(name)
    body += b"\x93"  # STACK_GLOBAL
    body += b"(" + b"".join(_str(a) for a in args) + b"t"  # MARK ... TUPLE
    body += b"R"  # REDUCE
    return b"\x80\x04" + body + b"."


class Reduce:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def touch(canary) -> str:
    return f"touch {canary}"


# Every callable the payloads below import: what an operator would have to allow for them to load.
DANGEROUS = [
    ("os", "system"), ("posix", "system"), ("subprocess", "Popen"), ("builtins", "exec"), ("builtins", "eval"),
    ("builtins", "__import__"), ("builtins", "getattr"), ("pip", "main"), ("pkgutil", "resolve_name"),
    ("importlib", "import_module"), ("runpy", "_run_code"), ("numpy.testing._private.utils", "runstring"),
    ("__main__", "Reduce"),
]


def payloads(canary) -> dict[str, bytes]:
    cmd = touch(canary)
    hidden_after_model = pickle.dumps(corpus.logistic_regression()) + call("os", "system", cmd)
    joblib_plain, joblib_zlib = io.BytesIO(), io.BytesIO()
    joblib.dump({"model": corpus.logistic_regression(), "x": Reduce(os.system, cmd)}, joblib_plain)
    joblib.dump(Reduce(os.system, cmd), joblib_zlib, compress=3)
    return {
        "os.system": call("os", "system", cmd),
        "posix.system": pickle.dumps(Reduce(os.system, cmd)),
        "subprocess.Popen": call("subprocess", "Popen", cmd),
        "builtins.exec": call("builtins", "exec", f"open({str(canary)!r}, 'w')"),
        "builtins.eval": call("builtins", "eval", f"open({str(canary)!r}, 'w')"),
        "builtins.__import__": call("builtins", "__import__", "os"),
        "builtins.getattr": call("builtins", "getattr", "os", "system"),
        "pip.main": call("pip", "main", "install", "evil"),
        "pkgutil.resolve_name": call("pkgutil", "resolve_name", "os:system"),
        "importlib.import_module": call("importlib", "import_module", "os"),
        "runpy._run_code": call("runpy", "_run_code", f"open({str(canary)!r}, 'w')", "{}"),
        "memo-hidden os.system": call("os", "system", cmd, via_memo=True),
        "numpy runstring": call("numpy.testing._private.utils", "runstring", f"open({str(canary)!r}, 'w')", "{}"),
        "hidden after a valid estimator": hidden_after_model,
        "inside a joblib file": joblib_plain.getvalue(),
        "inside a compressed joblib file": joblib_zlib.getvalue(),
    }


def computed_global() -> bytes:
    """STACK_GLOBAL whose module name is the result of a call: cannot be resolved statically."""
    body = _str("builtins") + _str("str") + b"\x93" + b"(" + _str("os") + b"tR" + _str("system") + b"\x93."
    return b"\x80\x04" + body


def truncated(model_bytes: bytes) -> bytes:
    return model_bytes[: len(model_bytes) // 2]




def loading_bombs(canary) -> dict[str, bytes]:
    """Payloads that only fail when loaded under limits: they must fail the deployment, not the host."""
    return {
        "huge allocation": call("builtins", "exec", "x = bytearray(64 * 1024**3)"),
        "infinite loop": call("builtins", "exec", "while True: pass"),
    }
