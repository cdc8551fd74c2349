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
    ("os", "system"),
    ("posix", "system"),
    ("subprocess", "Popen"),
    ("builtins", "exec"),
    ("builtins", "eval"),
    ("builtins", "__import__"),
    ("builtins", "getattr"),
    ("pip", "main"),
    ("pkgutil", "resolve_name"),
    ("importlib", "import_module"),
    ("runpy", "_run_code"),
    ("numpy.testing._private.utils", "runstring"),
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


# ---------------------------------------------------------------- hand-assembled pickles
#
# Attacks on the static scan itself: files that joblib reads differently from a
# naive walk of their opcodes, and files that make the walk itself expensive.
# The desync payloads only ever call `builtins.print(marker)`, so that a test may
# show, in a subprocess, that joblib.load really runs what the scan must see.

import struct  # noqa: E402  (kept with the code that uses it)
import zlib  # noqa: E402

NONE, TRUE, FALSE, STOP, POP, DUP = b"N", b"\x88", b"\x89", b".", b"0", b"2"
BUILD, REDUCE, NEWOBJ, EMPTY_TUPLE, TUPLE1, TUPLE2, MEMOIZE = b"b", b"R", b"\x81", b")", b"\x85", b"\x86", b"\x94"
PROTO4 = b"\x80\x04"
JOBLIB_WRAPPER = ("joblib.numpy_pickle", "NumpyArrayWrapper")


def _global(module: str, name: str) -> bytes:
    return _str(module) + _str(name) + b"\x93"  # STACK_GLOBAL


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)  # BININT


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _dict(items: dict[str, bytes]) -> bytes:
    return b"}(" + b"".join(_str(key) + value for key, value in items.items()) + b"u"  # EMPTY_DICT MARK ... SETITEMS


def frame(body: bytes) -> bytes:
    return b"\x95" + struct.pack("<Q", len(body)) + body  # FRAME


def swallow(size: int) -> bytes:
    """BINBYTES header: the unpickler reads the next `size` bytes as one bytes object."""
    return b"B" + struct.pack("<I", size)


def hidden_call(marker: str, module: str = "builtins", name: str = "print") -> bytes:
    """module.name(marker), result dropped: leaves the stack as it found it."""
    return _global(module, name) + _str(marker) + TUPLE1 + REDUCE + POP


def numpy_array() -> bytes:
    """numpy.array([1.0]): what joblib's byte-order check needs an object array's pickle to return."""
    return _global("numpy", "array") + b"]G" + struct.pack(">d", 1.0) + b"a" + TUPLE1 + REDUCE


def dtype(code: str, itemsize: int = -1, flags: int = 0) -> bytes:
    """numpy.dtype(code, False, True) and its __setstate__, as numpy pickles one."""
    state = _tuple(_int(3), _str("<"), NONE, NONE, NONE, _int(itemsize), _int(-1), _int(flags))
    return _global("numpy", "dtype") + _tuple(_str(code), FALSE, TRUE) + REDUCE + state + BUILD


def array_wrapper(
    shape,
    dtype_bytes: bytes,
    alignment: int | None = None,
    allow_mmap: bool = False,
    create: bytes | None = None,
    **extra: bytes,
) -> bytes:
    """A joblib NumpyArrayWrapper and its BUILD: joblib reads the array's bytes right after it."""
    state = {
        "subclass": _global("numpy", "ndarray"),
        "shape": shape if isinstance(shape, bytes) else _tuple(*(_int(n) for n in shape)),
        "order": _str("C"),
        "dtype": dtype_bytes,
        "allow_mmap": TRUE if allow_mmap else FALSE,
        "numpy_array_alignment_bytes": NONE if alignment is None else _int(alignment),
        **extra,
    }
    create = _global(*JOBLIB_WRAPPER) + EMPTY_TUPLE + NEWOBJ if create is None else create
    return create + _dict(state) + BUILD


def diverge(runs_after: int, skips_after: int, hidden: bytes, head: bytes = b"") -> bytes:
    """The bytes after an array wrapper, for two readers that disagree on how long the array is.

    The reader that resumes `runs_after` bytes in runs `hidden`; the one that resumes
    `skips_after` bytes in meets a BINBYTES header that reads over `hidden` as data. Both
    then go on with whatever follows these bytes. `head` (joblib's padding length) starts them.
    """
    if runs_after > skips_after:
        header_at, end = skips_after, runs_after + len(hidden)
        body = bytearray(b"\xff" * runs_after + hidden)
    else:
        header_at, end = runs_after + len(hidden), skips_after
        body = bytearray(b"\xff" * runs_after + hidden + b"\xff" * (skips_after - header_at))
    assert header_at >= len(head) and end - header_at >= 5, "not enough room for the BINBYTES header"
    body[header_at : header_at + 5] = swallow(end - header_at - 5)
    body[: len(head)] = head
    return bytes(body)


def joblib_zlib(data: bytes) -> bytes:
    """joblib's zlib format is one zlib stream of the very same bytes."""
    return zlib.compress(data, 3)


# -- files joblib reads differently from a naive walk of their opcodes


def padding_without_mmap(marker: str) -> bytes:
    """joblib reads a padding byte iff numpy_array_alignment_bytes is set, whatever allow_mmap says."""
    # joblib: padding length 15, 15 padding bytes, 8 bytes of float64, then `hidden`.
    # A walk that reads padding only when allow_mmap is true resumes 8 bytes in, on a BINBYTES.
    region = diverge(runs_after=1 + 15 + 8, skips_after=8, hidden=hidden_call(marker), head=bytes([15]))
    return PROTO4 + array_wrapper((1,), dtype("f8"), alignment=16, allow_mmap=False) + region + STOP


def itemsize_from_a_fixed_type_state(marker: str) -> bytes:
    """numpy ignores the item size in a float64's dtype state: joblib reads 8 bytes per item, not 64."""
    region = diverge(runs_after=2 * 8, skips_after=2 * 64, hidden=hidden_call(marker))
    return PROTO4 + array_wrapper((2,), dtype("f8", itemsize=64)) + region + STOP


def opcodes_in_a_frame_after_an_array(marker: str) -> bytes:
    """joblib reads the array from the file behind the frame, then goes on with the rest of the frame."""
    rest_of_frame = hidden_call(marker) + STOP
    wrapper = array_wrapper((len(rest_of_frame),), dtype("u1"))
    # A walk that ignores the frame skips the rest of the frame as if it were the array,
    # then reads the real array bytes, written for it, as opcodes.
    array_bytes = NONE * (len(rest_of_frame) - 1) + STOP
    return PROTO4 + frame(wrapper + rest_of_frame) + array_bytes


def model_with_a_hidden_call(model, marker: str, module: str = "builtins", name: str = "print") -> bytes:
    """A real joblib.dump of `model` that also runs module.name(marker), hidden as above; still loads as the model."""
    buffer = io.BytesIO()
    joblib.dump(model, buffer)
    data = buffer.getvalue()
    # The last frame runs to the final STOP (array bytes between frames keep pickletools from finding it).
    start = next(
        at
        for at in range(len(data) - 10, -1, -1)
        if data[at] == 0x95 and struct.unpack("<Q", data[at + 1 : at + 9])[0] == len(data) - at - 9
    )
    # Drop the final STOP (and shorten its frame): the model stays on the stack for the gadget below.
    data = data[: start + 1] + struct.pack("<Q", len(data) - start - 10) + data[start + 9 : -1]
    rest_of_frame = hidden_call(marker, module, name) + POP + STOP  # POP drops the gadget's array
    wrapper = array_wrapper((len(rest_of_frame),), dtype("u1"))
    return data + frame(wrapper + rest_of_frame) + NONE * (len(rest_of_frame) - 1) + STOP


def float_array_that_claims_objects(marker: str) -> bytes:
    """numpy takes `hasobject` from the dtype state's flags: joblib reads this float64 array as a nested pickle."""
    nested = PROTO4 + hidden_call(marker) + numpy_array() + STOP
    wrapper = array_wrapper((16,), dtype("f8", flags=1))
    return PROTO4 + wrapper + diverge(runs_after=len(nested), skips_after=16 * 8, hidden=b"", head=nested) + STOP


def wrapper_inside_an_object_array(marker: str) -> bytes:
    """An object array's pickle is a plain pickle: an array wrapper in it reads nothing."""
    hidden = hidden_call(marker)
    size = len(hidden) + 16
    nested = PROTO4 + array_wrapper((size,), dtype("u1")) + diverge(runs_after=0, skips_after=size, hidden=hidden)
    nested += POP + numpy_array() + STOP
    return PROTO4 + array_wrapper((1,), dtype("O8", flags=63)) + nested + STOP


def wrapper_built_through_copyreg(marker: str) -> bytes:
    """copyreg._reconstructor (allowlisted) makes a NumpyArrayWrapper without naming it as the callable."""
    create = (
        _global("copyreg", "_reconstructor")
        + _tuple(_global(*JOBLIB_WRAPPER), _global("builtins", "object"), NONE)
        + REDUCE
    )
    region = diverge(runs_after=24, skips_after=0, hidden=hidden_call(marker))
    return PROTO4 + array_wrapper((24,), dtype("u1"), create=create) + region + STOP


def array_read_from_another_file(marker: str, filename: str) -> bytes:
    """joblib < 0.10's NDArrayWrapper np.load()s `filename`, pickles allowed, from the model's folder.

    Pointed at the model file itself, it unpickles the file again from the start, but
    plainly: that reading runs through the array bytes that joblib skips.
    """
    old_wrapper = _global("joblib.numpy_pickle_compat", "NDArrayWrapper") + EMPTY_TUPLE + NEWOBJ
    old_wrapper += _dict({"filename": _str(filename), "subclass": _global("numpy", "ndarray"), "allow_mmap": FALSE})
    hidden = hidden_call(marker)
    size = len(hidden) + 16
    region = diverge(runs_after=0, skips_after=size, hidden=hidden)
    return (
        PROTO4 + old_wrapper + BUILD + POP + array_wrapper((size,), dtype("u1")) + region + POP + numpy_array() + STOP
    )


def joblib_load_output(data: bytes, tmp_path, filename: str = "model.joblib") -> str:
    """Run joblib.load on `data` in a child process (never in the tests' own); return what it printed."""
    import subprocess
    import sys

    path = tmp_path / filename
    path.write_bytes(data)
    code = "import sys, joblib; joblib.load(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    return done.stdout + done.stderr


# -- files that make the walk itself expensive


def shared_tuple_dtype(levels: int = 40) -> bytes:
    """A dtype code that is a tuple of itself, doubled `levels` times through the memo: str() of it never ends."""
    shared = _str("f8") + MEMOIZE + POP
    for level in range(levels):
        get = b"h" + bytes([level])  # BINGET
        shared += get + get + TUPLE2 + MEMOIZE + POP  # memo[level + 1] = (memo[level], memo[level])
    shared += b"h" + bytes([levels])
    code = _global("numpy", "dtype") + b"(" + shared + FALSE + TRUE + b"t" + REDUCE
    code += _tuple(_int(3), _str("<"), NONE, NONE, NONE, _int(-1), _int(-1), _int(0)) + BUILD
    return PROTO4 + array_wrapper((1,), code) + b"\x00" * 8 + STOP


def nested_object_arrays(depth: int) -> bytes:
    """An object array holding an object array holding ... `depth` levels, each a nested pickle."""
    level = PROTO4 + array_wrapper((1,), dtype("O8", flags=63))
    return level * depth + PROTO4 + NONE + STOP + STOP * depth


def array_bomb(compression: str, declared_bytes: int = 1 << 30, actual_bytes: int = 64 << 20) -> bytes:
    """A joblib file that declares a float64 array of `declared_bytes` and holds `actual_bytes` of zeros, compressed."""
    head = PROTO4 + array_wrapper((declared_bytes // 8,), dtype("f8"))
    return compress(compression, head, zero_bytes=actual_bytes)


def compress(compression: str, data: bytes, zero_bytes: int = 0) -> bytes:
    """data, then `zero_bytes` zeros, in one stream of `compression` (zeros added a MiB at a time)."""
    import bz2
    import lzma

    import lz4.frame

    compressor = {
        "zlib": lambda: zlib.compressobj(9),
        "gzip": lambda: zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS),
        "bz2": lambda: bz2.BZ2Compressor(9),
        "xz": lambda: lzma.LZMACompressor(format=lzma.FORMAT_XZ),
        "lz4": lambda: lz4.frame.LZ4FrameCompressor(compression_level=16),
    }[compression]()
    pieces = [compressor.begin()] if compression == "lz4" else []
    pieces.append(compressor.compress(data))
    zeros = bytes(1 << 20)
    for _ in range(zero_bytes >> 20):
        pieces.append(compressor.compress(zeros))
    pieces.append(compressor.flush())
    return b"".join(pieces)
