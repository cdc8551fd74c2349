"""Static inspection of uploaded model files: nothing here ever unpickles.

A pickle is a program for a small stack machine; the only way it can reach
code is by importing a global (GLOBAL, STACK_GLOBAL, INST) and calling it.
`scan_pickle` walks the opcodes with a symbolic stack, so that STACK_GLOBAL
operands are resolved through the stack and the memo exactly as the real
unpickler would, and lists every (module, name) the file would import. A
global whose name cannot be resolved statically is refused.

joblib files interleave raw array bytes with the pickle opcodes (and write
object arrays as nested pickles); the walker follows that layout too, so a
joblib file is scanned whole, not just up to its first array.
"""

import bz2
import gzip
import io
import json
import lzma
import pickletools
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

SKLEARN_VERSION_KEY = "_sklearn_version"
JOBLIB_WRAPPER = ("joblib.numpy_pickle", "NumpyArrayWrapper")
MAX_DECOMPRESSED_BYTES = 4 * 1024**3


class InspectionError(ValueError):
    """The file is not a model ServeML can read; the message says why, for a person."""


@dataclass(frozen=True)
class Global:
    module: str
    name: str

    def __str__(self):
        return f"{self.module}.{self.name}"


@dataclass
class Obj:
    """Something the unpickler would build by calling `func`; never built here."""

    func: object
    args: object = None
    state: object = None


class Unknown:
    """A value the walker does not track (numbers in lists, bytes, …)."""


UNKNOWN = Unknown()


@dataclass
class ScanResult:
    format: str  # "pickle" | "joblib" | "skops"
    compression: str = ""
    globals: set[Global] = field(default_factory=set)
    sklearn_versions: set[str] = field(default_factory=set)

    @property
    def sklearn_version(self) -> str | None:
        return max(self.sklearn_versions, key=_version_key) if self.sklearn_versions else None

    @property
    def uses_numpy2_layout(self) -> bool:
        return any(g.module == "numpy._core" or g.module.startswith("numpy._core.") for g in self.globals)

    @property
    def uses_numpy1_layout(self) -> bool:
        return any(g.module == "numpy.core" or g.module.startswith("numpy.core.") for g in self.globals)


def _version_key(version: str):
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.+-]", version))


# ---------------------------------------------------------------- formats

COMPRESSIONS = [
    (b"\x1f\x8b", "gzip", gzip.GzipFile),
    (b"BZh", "bz2", bz2.BZ2File),
    (b"\xfd7zXZ\x00", "xz", lzma.LZMAFile),
    (b"\x04\x22\x4d\x18", "lz4", None),
]
ZLIB_HEADERS = (b"\x78\x01", b"\x78\x5e", b"\x78\x9c", b"\x78\xda")


def sniff_format(head: bytes) -> tuple[str, str]:
    """Return (format, compression) from a file's first bytes, or raise InspectionError."""
    if not head:
        raise InspectionError("The model file is empty. Upload the file your training code saved.")
    if head[:4] == b"PK\x03\x04":
        return "skops", ""
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle", ""
    if head[:2] in ZLIB_HEADERS:
        return "joblib", "zlib"
    for magic, name, _ in COMPRESSIONS:
        if head.startswith(magic):
            return "joblib", name
    if head[:1] in (b"(", b"c", b"]", b"}") and all(32 <= b < 127 or b in (9, 10, 13) for b in head[:64]):
        raise InspectionError(
            "This looks like a pickle written with protocol 0 or 1, which ServeML does not accept. "
            "Save the model again with pickle protocol 2 or newer (the default), joblib.dump or skops."
        )
    raise InspectionError(
        "This is not a model file ServeML can read: it is neither a pickle, a joblib file nor a skops file. "
        "Save the model with pickle.dump, joblib.dump or skops.io.dump and upload that file."
    )


def _open_decompressed(stream: BinaryIO, compression: str) -> BinaryIO:
    """Decompress into a temporary file, refusing decompression bombs."""
    import tempfile

    if compression == "zlib":
        reader = _ZlibReader(stream)
    elif compression == "lz4":
        import lz4.frame

        reader = lz4.frame.LZ4FrameFile(stream, "rb")
    else:
        opener = next(factory for _, name, factory in COMPRESSIONS if name == compression)
        reader = opener(stream, "rb") if opener is not gzip.GzipFile else gzip.GzipFile(fileobj=stream, mode="rb")
    out = tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024)
    total = 0
    try:
        while chunk := reader.read(1024 * 1024):
            total += len(chunk)
            if total > MAX_DECOMPRESSED_BYTES:
                raise InspectionError("The compressed model expands to more than 4 GB; ServeML refuses it.")
            out.write(chunk)
    except (OSError, EOFError, zlib.error, RuntimeError) as exc:
        if isinstance(exc, InspectionError):
            raise
        raise InspectionError(f"The {compression}-compressed model file is damaged or truncated ({exc}).") from None
    out.seek(0)
    return out


class _ZlibReader:
    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.decompressor = zlib.decompressobj()

    def read(self, size: int) -> bytes:
        while True:
            chunk = self.stream.read(size)
            if not chunk:
                if not self.decompressor.eof:
                    raise EOFError("compressed stream ended early")
                return self.decompressor.flush()
            data = self.decompressor.decompress(chunk)
            if data:
                return data


# ---------------------------------------------------------------- pickle walk

MARK = object()


def _scan_stream(stream: BinaryIO, result: ScanResult) -> None:
    """Walk one pickle from the stream's current position to its STOP."""
    stack: list = []
    metastack: list[list] = []
    memo: dict = {}

    def pop_mark() -> list:
        nonlocal stack
        items = stack
        stack = metastack.pop()
        return items

    def add_global(module, name) -> Global:
        if not isinstance(module, str) or not isinstance(name, str):
            raise InspectionError(
                "The model file imports a name that cannot be resolved without running it "
                "(STACK_GLOBAL with computed operands). ServeML refuses such files."
            )
        found = Global(module, name)
        result.globals.add(found)
        return found

    try:
        for opcode, arg, _pos in pickletools.genops(stream):
            name = opcode.name
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                return
            if name == "MARK":
                metastack.append(stack)
                stack = []
            elif name in ("GLOBAL", "INST"):
                module, _, attr = arg.partition(" ")
                found = add_global(module, attr)
                if name == "INST":
                    stack = metastack.pop()
                    stack.append(Obj(found))
                else:
                    stack.append(found)
            elif name == "STACK_GLOBAL":
                attr = stack.pop()
                module = stack.pop()
                stack.append(add_global(module, attr))
            elif name in ("EXT1", "EXT2", "EXT4"):
                raise InspectionError(
                    "The model file uses the copyreg extension registry (EXT opcodes), "
                    "which can import arbitrary code. ServeML refuses such files."
                )
            elif name in ("PERSID", "BINPERSID"):
                raise InspectionError("The model file refers to persistent objects, which ServeML cannot load.")
            elif name in ("BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
                          "BINSTRING", "SHORT_BINSTRING"):
                stack.append(arg if isinstance(arg, str) else UNKNOWN)
            elif name in ("BININT", "BININT1", "BININT2", "INT", "LONG", "LONG1", "LONG4"):
                stack.append(arg)
            elif name in ("NONE",):
                stack.append(None)
            elif name in ("NEWTRUE", "NEWFALSE"):
                stack.append(name == "NEWTRUE")
            elif name in ("BINFLOAT", "FLOAT", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8",
                          "NEXT_BUFFER"):
                stack.append(UNKNOWN)
            elif name == "READONLY_BUFFER":
                pass
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                count = int(name[-1])
                items = tuple(stack[-count:])
                del stack[-count:]
                stack.append(items)
            elif name == "TUPLE":
                items = pop_mark()  # not inlined: stack.append must bind after the pop
                stack.append(tuple(items))
            elif name in ("EMPTY_LIST", "EMPTY_SET"):
                stack.append([])
            elif name in ("LIST", "FROZENSET"):
                items = pop_mark()
                stack.append(items)
            elif name == "APPEND":
                value = stack.pop()
                if isinstance(stack[-1], list):
                    stack[-1].append(value)
            elif name in ("APPENDS", "ADDITEMS"):
                items = pop_mark()
                if isinstance(stack[-1], list):
                    stack[-1].extend(items)
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name == "DICT":
                items = pop_mark()
                stack.append(_pairs_to_dict(items, result))
            elif name == "SETITEM":
                value = stack.pop()
                key = stack.pop()
                _set_item(stack[-1], key, value, result)
            elif name == "SETITEMS":
                items = pop_mark()
                for key, value in zip(items[::2], items[1::2]):
                    _set_item(stack[-1], key, value, result)
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise InspectionError("The model file is malformed: it reads a memo slot it never wrote.")
                stack.append(memo[arg])
            elif name == "POP":
                stack.pop()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(stack[-1])
            elif name == "REDUCE":
                args = stack.pop()
                func = stack.pop()
                stack.append(Obj(func, args))
            elif name in ("NEWOBJ", "NEWOBJ_EX"):
                if name == "NEWOBJ_EX":
                    stack.pop()
                args = stack.pop()
                cls = stack.pop()
                stack.append(Obj(cls, args))
            elif name == "OBJ":
                items = pop_mark()
                stack.append(Obj(items[0] if items else UNKNOWN, tuple(items[1:])))
            elif name == "BUILD":
                state = stack.pop()
                target = stack[-1]
                if isinstance(target, Obj):
                    target.state = state
                    if target.func == Global(*JOBLIB_WRAPPER):
                        _skip_joblib_array(stream, state, result)
            else:
                raise InspectionError(f"The model file uses the pickle opcode {name}, which ServeML does not accept.")
    except InspectionError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, EOFError) as exc:
        raise InspectionError(
            "The model file is not a complete pickle: it may be truncated or damaged "
            f"({exc}). Upload the file again, exactly as your training code saved it."
        ) from None
    raise InspectionError(
        "The model file is not a complete pickle: it ends before the end of the model. "
        "Upload the file again, exactly as your training code saved it."
    )


def _pairs_to_dict(items: list, result: ScanResult) -> dict:
    out: dict = {}
    for key, value in zip(items[::2], items[1::2]):
        _set_item(out, key, value, result)
    return out


def _set_item(target, key, value, result: ScanResult) -> None:
    if key == SKLEARN_VERSION_KEY and isinstance(value, str):
        result.sklearn_versions.add(value)
    if isinstance(target, dict) and isinstance(key, (str, int)):
        target[key] = value


DTYPE_RE = re.compile(r"^[<>=|]?([biufcmMOSUV])(\d*)$")


def _skip_joblib_array(stream: BinaryIO, state, result: ScanResult) -> None:
    """Skip (or, for object arrays, walk) the array joblib wrote right after its wrapper."""
    if not isinstance(state, dict):
        raise InspectionError("The joblib file is malformed: an array wrapper has no readable state.")
    dtype, shape = state.get("dtype"), state.get("shape")
    if not (isinstance(dtype, Obj) and isinstance(dtype.args, tuple) and dtype.args and isinstance(shape, tuple)):
        raise InspectionError("The joblib file is malformed: an array's type or shape cannot be read.")
    match = DTYPE_RE.match(str(dtype.args[0]))
    if not match or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise InspectionError(f"The joblib file holds an array of an unsupported type ({dtype.args[0]!r}).")
    kind = match.group(1)
    if kind == "O":
        _scan_stream(stream, result)  # object arrays are written as a nested pickle
        return
    itemsize = int(match.group(2) or 0)
    dtype_state = dtype.state if isinstance(dtype.state, tuple) else ()
    if len(dtype_state) > 5 and isinstance(dtype_state[5], int) and dtype_state[5] > 0:
        itemsize = dtype_state[5]  # numpy records the real element size for str/bytes/void types
    if kind == "b" and not itemsize:
        itemsize = 1
    count = 1
    for n in shape:
        count *= n
    if state.get("allow_mmap"):
        padding = stream.read(1)
        if len(padding) != 1:
            raise InspectionError("The joblib file is truncated inside an array.")
        stream.seek(padding[0], io.SEEK_CUR)
    start = stream.tell()
    stream.seek(count * itemsize, io.SEEK_CUR)
    end = stream.seek(0, io.SEEK_END)
    if start + count * itemsize > end:
        raise InspectionError("The joblib file is truncated inside an array.")
    stream.seek(start + count * itemsize)


def scan_model_file(stream: BinaryIO) -> ScanResult:
    """List what a model file would import, without loading it. Raises InspectionError."""
    stream.seek(0)
    head = stream.read(16)
    stream.seek(0)
    fmt, compression = sniff_format(head)
    if fmt == "skops":
        return _scan_skops(stream)
    result = ScanResult(format=fmt, compression=compression)
    body = _open_decompressed(stream, compression) if compression else stream
    _scan_stream(body, result)
    if Global(*JOBLIB_WRAPPER) in result.globals:
        result.format = "joblib"
    trailing = body.read(1)
    if trailing:
        raise InspectionError(
            "The model file has more data after the end of the model. ServeML refuses files that "
            "carry a second hidden payload; upload the file exactly as pickle.dump or joblib.dump wrote it."
        )
    return result


def _scan_skops(stream: BinaryIO) -> ScanResult:

    result = ScanResult(format="skops")
    try:
        with zipfile.ZipFile(stream) as archive:
            schema = json.loads(archive.read("schema.json"))
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise InspectionError(f"The skops file is damaged or is not a skops file ({exc}).") from None

    def walk(node):
        if isinstance(node, dict):
            module, cls = node.get("__module__"), node.get("__class__")
            if isinstance(module, str) and isinstance(cls, str):
                result.globals.add(Global(module, cls))
            loader = node.get("__loader__")
            content = node.get("content")
            if loader == "FunctionNode" and isinstance(content, dict):
                result.globals.add(Global(str(content.get("module_path")), str(content.get("function"))))
            elif loader == "MethodNode":
                raise InspectionError("The skops file stores a bound method, which ServeML cannot check statically.")
            for key, value in node.items():
                if key == SKLEARN_VERSION_KEY and isinstance(value, dict) and isinstance(value.get("content"), str):
                    version = value["content"]
                    result.sklearn_versions.add(json.loads(version) if value.get("is_json") else version)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(schema)
    return result
