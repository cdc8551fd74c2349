"""Static inspection of uploaded model files: nothing here ever unpickles.

A pickle is a program for a small stack machine; the only way it can reach
code is by importing a global (GLOBAL, STACK_GLOBAL, INST) and calling it.
`_Walker` runs that program on symbolic values, so that STACK_GLOBAL operands
are resolved through the stack and the memo exactly as the real unpickler
would, and lists every (module, name) the file would import. A global whose
name cannot be resolved statically is refused.

What the walker reads must be exactly what the loader will execute, byte for
byte; where it cannot be sure, it refuses instead of guessing:

* joblib writes raw array bytes between the opcodes (and object arrays as a
  nested, plain pickle). joblib's unpickler takes opcodes from its current
  protocol-4 frame but array bytes from the file behind it, so the walker
  keeps frames exactly like `pickle._Unframer` and skips array bytes in the
  file. How many bytes an array takes is worked out the way joblib 1.2+ and
  numpy do (`_ArrayLayout`).
* Compressed files are decompressed as a stream (never to disk) and refused
  once they expand past a multiple of their own size.
* Every resource the walk uses is bounded (the limits below), and every
  failure, MemoryError and RecursionError included, becomes an
  InspectionError that tells the uploader what is wrong and what to do.
"""

import bz2
import codecs
import io
import itertools
import json
import lzma
import operator
import pickle
import pickletools
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

SKLEARN_VERSION_KEY = "_sklearn_version"
JOBLIB_WRAPPER = ("joblib.numpy_pickle", "NumpyArrayWrapper")

MiB = 1024**2

# Limits. Real models stay far below each of them; a file that reaches one is
# refused with a message that names it.
CHUNK_BYTES = 1 * MiB  # the most read or decompressed in one piece
MIN_DECOMPRESSED_LIMIT = 32 * MiB  # a compressed file may always expand this far...
DECOMPRESSION_RATIO = 100  # ...or this many times its own size...
MAX_DECOMPRESSED_BYTES = 4 * 1024 * MiB  # ...but never further than this
MAX_FRAME_BYTES = 64 * MiB  # picklers since Python 3.7 write frames of about 64 KiB
MAX_LINE_BYTES = 64 * 1024  # text opcodes (GLOBAL, INT, ...) end at a newline
MAX_KEPT_TEXT = 64 * 1024  # longer strings are skipped: no name or key is that long
MAX_NAME_CHARS = 1000  # module + name of an imported global
# The walk costs up to some 70 bytes and a few microseconds per opcode run, hence:
MIN_OPCODES = 100_000  # a file may always run this many pickle instructions...
OPCODES_PER_BYTE = 16  # ...or this many per byte uploaded (real models: under 1, regular data under 5)...
MAX_OPCODES = 10_000_000  # ...but never more (a vocabulary of some three million words)
MAX_STACK_ITEMS = 1_000_000  # picklers push at most 1,000 items per MARK
MAX_MARK_DEPTH = 10_000  # Python's recursion limit keeps real nesting in the hundreds
MAX_MEMO_ENTRIES = 2_000_000  # every object a pickler writes twice or more, every string
MAX_TRACKED_ITEMS = 64  # items kept per tuple or dict: wrapper and dtype states are small
MAX_SCHEMA_BYTES = 16 * MiB  # a skops schema.json
MAX_SCHEMA_NODES = 1_000_000
MAX_ZIP_DIRECTORY_BYTES = 4 * MiB  # a skops file's list of members

RESAVE = "Save the model again with pickle.dump, joblib.dump or skops.io.dump and upload that file."
REUPLOAD = "Upload the file again, exactly as your training code saved it."


class InspectionError(ValueError):
    """The file is not a model ServeML can read; the message says why, for a person."""


def _refused(problem: str, fix: str = RESAVE) -> InspectionError:
    return InspectionError(f"The model file {problem}. ServeML refuses it. {fix}")


def _incomplete(detail: str = "it ends before the end of the model") -> InspectionError:
    return InspectionError(f"The model file is not a complete pickle: {detail}. {REUPLOAD}")


@dataclass(frozen=True)
class Global:
    module: str
    name: str

    def __str__(self):
        return f"{self.module}.{self.name}"


WRAPPER = Global(*JOBLIB_WRAPPER)
NUMPY_DTYPE = Global("numpy", "dtype")


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
    return tuple(int(p) if p.isdecimal() else 0 for p in re.split(r"[.+-]", version))


def scan_model_file(stream: BinaryIO) -> ScanResult:
    """List what a model file would import, without loading it. Raises InspectionError."""
    stream.seek(0)
    head = stream.read(16)
    stream.seek(0)
    fmt, compression = sniff_format(head)
    try:
        if fmt == "skops":
            return _scan_skops(stream)
        return _scan_pickle(stream, ScanResult(format=fmt, compression=compression))
    except MemoryError:
        raise _refused("needs more memory to inspect than ServeML allows", REUPLOAD) from None
    except RecursionError:
        raise _refused("is nested too deeply to inspect") from None


# ---------------------------------------------------------------- formats

ZLIB_HEADERS = (b"\x78\x01", b"\x78\x5e", b"\x78\x9c", b"\x78\xda")
COMPRESSIONS = [(b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"), (b"\x04\x22\x4d\x18", "lz4")]


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
    for magic, name in COMPRESSIONS:
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


def _scan_pickle(stream: BinaryIO, result: ScanResult) -> ScanResult:
    size = stream.seek(0, io.SEEK_END)
    stream.seek(0)
    chunks = _decompressed_chunks(stream, result.compression, size) if result.compression else _raw_chunks(stream)
    source = _Input(chunks)
    try:
        walker = _Walker(source, result, _Budget(size), reads_arrays=True)
        walker.walk()
        if walker.frames.leftover() or not source.at_end():
            raise InspectionError(
                "The model file has more data after the end of the model. ServeML refuses files that "
                "carry a second hidden payload; upload the file exactly as pickle.dump or joblib.dump wrote it."
            )
    except (InspectionError, MemoryError, RecursionError):
        raise
    except (EOFError, OSError, zlib.error, lzma.LZMAError, RuntimeError) as exc:
        # What the decompressors raise on damaged data (lz4 raises RuntimeError).
        kind = f"{result.compression}-compressed model file" if result.compression else "model file"
        raise InspectionError(f"The {kind} is damaged or truncated ({exc}). {REUPLOAD}") from None
    except (ValueError, IndexError, KeyError, TypeError, struct.error, OverflowError) as exc:
        # The real unpickler fails on the same input, so nothing after this point would run.
        raise _incomplete(f"it may be truncated or damaged ({type(exc).__name__}: {str(exc)[:200]})") from None
    if WRAPPER in result.globals:
        result.format = "joblib"
    return result


# ---------------------------------------------------------------- reading bytes


def _raw_chunks(stream: BinaryIO):
    while chunk := stream.read(CHUNK_BYTES):
        yield chunk


def _decompressed_chunks(stream: BinaryIO, compression: str, size: int):
    """Yield the decompressed data of one compressed stream, refusing bombs and anything after it."""
    limit = min(MAX_DECOMPRESSED_BYTES, max(MIN_DECOMPRESSED_LIMIT, DECOMPRESSION_RATIO * size))
    decompressor = _decompressor(compression)
    expanded = 0
    while not decompressor.eof:
        data = stream.read(CHUNK_BYTES) if decompressor.needs_input else b""
        out = decompressor.decompress(data, CHUNK_BYTES)
        if not out and not data and not decompressor.eof:
            raise InspectionError(f"The {compression}-compressed model file is truncated or damaged. {REUPLOAD}")
        expanded += len(out)
        if expanded > limit:
            raise _refused(
                f"expands to more than {limit // MiB} MiB when decompressed, over {DECOMPRESSION_RATIO} times "
                "its own size (a decompression bomb)",
                "If this really is your model, save it without compression (joblib.dump(model, path)) "
                "and upload that file.",
            )
        if out:
            yield out
    # joblib reads one zlib or gzip stream; bz2, xz and lz4 readers go on into a second one.
    if decompressor.unused_data or stream.read(1):
        raise _refused(
            f"has more data after the end of its {compression}-compressed stream",
            "Upload the file exactly as joblib.dump wrote it.",
        )


def _decompressor(compression: str):
    if compression == "zlib":
        return _ZlibDecompressor(zlib.MAX_WBITS)
    if compression == "gzip":
        return _ZlibDecompressor(16 + zlib.MAX_WBITS)  # a gzip header, as joblib writes and reads it
    if compression == "bz2":
        return bz2.BZ2Decompressor()
    if compression == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    import lz4.frame

    return lz4.frame.LZ4FrameDecompressor()


class _ZlibDecompressor:
    """zlib.decompressobj with the interface of bz2, lzma and lz4's decompressors."""

    def __init__(self, wbits: int):
        self._inner = zlib.decompressobj(wbits)

    @property
    def eof(self) -> bool:
        return self._inner.eof

    @property
    def unused_data(self) -> bytes:
        return self._inner.unused_data

    @property
    def needs_input(self) -> bool:
        return not self._inner.unconsumed_tail

    def decompress(self, data: bytes, max_length: int) -> bytes:
        return self._inner.decompress(self._inner.unconsumed_tail + data, max_length)


class _Input:
    """The bytes a loader reads from the file: the upload itself, or its decompressed stream.

    Reads are bounded by what is really there: a length field of 2**60 costs
    nothing until that many bytes arrive, and skipping reads and discards in
    chunks, so a decompressed stream never has to be held anywhere.
    """

    def __init__(self, chunks):
        self._chunks = chunks
        self._buffer = b""
        self._offset = 0

    def _available(self) -> int:
        """Bytes buffered and not yet read; 0 only at the end of the data."""
        if self._offset == len(self._buffer):
            self._buffer, self._offset = next(self._chunks, b""), 0
        return len(self._buffer) - self._offset

    def read(self, n: int) -> bytes:
        """Up to n bytes: fewer only at the end of the data."""
        end = self._offset + n
        if end <= len(self._buffer):  # the common case, once per opcode of an unframed pickle
            data = self._buffer[self._offset : end]
            self._offset = end
            return data
        pieces = []
        while n > 0 and (available := self._available()):
            step = min(n, available)
            pieces.append(self._buffer[self._offset : self._offset + step])
            self._offset += step
            n -= step
        return b"".join(pieces)

    def skip(self, n: int) -> int:
        """Skip up to n bytes; return how many were there."""
        skipped = 0
        while skipped < n and (available := self._available()):
            step = min(n - skipped, available)
            self._offset += step
            skipped += step
        return skipped

    def readline(self) -> bytes:
        """Up to and including the next newline, or to the end of the data."""
        pieces, size = [], 0
        while self._available():
            end = self._buffer.find(b"\n", self._offset)
            stop = len(self._buffer) if end < 0 else end + 1
            pieces.append(self._buffer[self._offset : stop])
            size += stop - self._offset
            self._offset = stop
            if size > MAX_LINE_BYTES:
                raise _refused(f"has a text opcode longer than {MAX_LINE_BYTES} bytes")
            if end >= 0:
                break
        return b"".join(pieces)

    def at_end(self) -> bool:
        return not self._available()


class _Unframer:
    """`pickle._Unframer`: while a protocol-4 frame is loaded, opcodes come from it, not from the file.

    joblib reads array bytes from the file itself, behind the current frame;
    keeping frames exactly as the unpickler does is what makes the walk see the
    opcodes joblib will execute, in the order it will execute them.
    """

    def __init__(self, source: _Input):
        self.source = source
        self.frame: io.BytesIO | None = None
        self.frame_size = 0

    def _frame_left(self, n: int) -> bool:
        """Whether the next n bytes come from the current frame (pickle moves to the file once it is used up)."""
        if self.frame is None:
            return False
        left = self.frame_size - self.frame.tell()
        if left == 0 and n != 0:
            self.frame = None
            return False
        if left < n:
            raise _incomplete("an opcode runs past the end of its frame")
        return True

    def read(self, n: int) -> bytes:
        if self.frame is not None:  # first the common case, once per opcode: all n bytes are in the frame
            data = self.frame.read(n)
            if len(data) == n:
                return data
            self.frame.seek(-len(data), io.SEEK_CUR)
        if self._frame_left(n):
            return self.frame.read(n)
        return self.source.read(n)

    def skip(self, n: int) -> None:
        if self._frame_left(n):
            self.frame.seek(n, io.SEEK_CUR)
        elif self.source.skip(n) < n:
            raise _incomplete()

    def readline(self) -> bytes:
        if self.frame is not None:
            line = self.frame.readline()
            if line:
                if not line.endswith(b"\n"):
                    raise _incomplete("a text opcode runs past the end of its frame")
                return line
            self.frame = None
        return self.source.readline()

    def load_frame(self, size: int) -> None:
        if self.leftover():
            raise _incomplete("a frame starts before the previous one ends")
        if size > MAX_FRAME_BYTES:
            raise _refused(
                f"has a pickle frame of {size} bytes; pickle writers since Python 3.7 never write one "
                f"over {MAX_FRAME_BYTES // MiB} MiB",
                "Save the model again with a current Python.",
            )
        data = self.source.read(size)
        if len(data) < size:
            raise _incomplete()
        self.frame, self.frame_size = io.BytesIO(data), size

    def leftover(self) -> bool:
        """Whether the current frame holds bytes not read yet."""
        return self.frame is not None and self.frame.tell() < self.frame_size


# ---------------------------------------------------------------- symbolic values


class Obj:
    """Something the unpickler would build by calling `func` (or `func.__new__`); never built here."""

    __slots__ = ("func", "args", "called", "state", "builds")

    def __init__(self, func, args, called: bool):
        self.func, self.args, self.called = func, args, called
        self.state, self.builds = None, 0


class _Dict:
    """A dict the pickle builds. Keeps its first string and int keys: wrapper and dtype states are small."""

    __slots__ = ("items", "opaque")

    def __init__(self):
        self.items: dict | None = None  # created on the first key: most dicts in a model are never looked at
        self.opaque = False  # a key the walk cannot name, or too many keys to keep

    def set(self, key, value) -> None:
        if self.items is None:
            self.items = {}
        if type(key) in (str, int) and (key in self.items or len(self.items) < MAX_TRACKED_ITEMS):
            self.items[key] = value
        else:
            self.opaque = True


class _Seq:
    """A list or set the pickle builds: what is in it never changes what the file imports."""

    __slots__ = ()


SEQ = _Seq()  # shared: nothing ever looks inside one, so no list costs memory


class Unknown:
    """A value the walker does not track (bytes, floats, loaded arrays, long tuples, ...)."""


UNKNOWN = Unknown()


def _tuple(items) -> tuple | Unknown:
    return tuple(items) if len(items) <= MAX_TRACKED_ITEMS else UNKNOWN


U1, U2, U4, U8, I4 = (struct.Struct(fmt) for fmt in ("<B", "<H", "<I", "<Q", "<i"))


class _Budget:
    """Opcodes left for the whole file, nested pickles included.

    Relative to the upload's size, so that a small compressed file cannot keep
    the walk busy (or its memory, which grows with the opcodes run) for long.
    """

    __slots__ = ("opcodes", "limit")

    def __init__(self, upload_bytes: int):
        self.limit = self.opcodes = min(MAX_OPCODES, max(MIN_OPCODES, OPCODES_PER_BYTE * upload_bytes))

    def exhausted(self) -> InspectionError:
        return _refused(
            f"runs more than {self.limit:,} pickle instructions, more than ServeML allows for a file of its size "
            f"({OPCODES_PER_BYTE} per byte, {MAX_OPCODES:,} at most)",
            "If this really is your model, save it without compression and upload that file.",
        )


# ---------------------------------------------------------------- the pickle walk


class _Walker:
    """Runs one pickle on symbolic values, from its first opcode to its STOP.

    Each `load_*` method mirrors the `pickle._Unpickler` method of the same
    name (and so joblib's unpickler, which is built on it): it reads the same
    argument bytes and leaves the same shape of stack. With `reads_arrays`, a
    BUILD of joblib's array wrapper also reads the array that follows, as
    joblib's NumpyUnpickler does; the nested pickle of an object array is a
    plain pickle, walked without it.
    """

    def __init__(self, source: _Input, result: ScanResult, budget: _Budget, reads_arrays: bool):
        self.source = source
        self.frames = _Unframer(source)
        self.result = result
        self.budget = budget
        self.reads_arrays = reads_arrays
        self.stack: list = []
        self.metastack: list[list] = []
        self.marked = 0  # items held in self.metastack
        self.memo: dict = {}
        self.value = None

    def walk(self):
        """Walk to STOP and return the value the pickle would return."""
        read, handlers, budget = self.frames.read, _HANDLERS, self.budget
        while True:
            code = read(1)
            if not code:
                raise _incomplete()
            handler = handlers[code[0]]
            if handler is None:
                raise _incomplete(f"byte {code[0]:#04x} is not a pickle opcode")
            budget.opcodes -= 1
            if budget.opcodes < 0:
                raise budget.exhausted()
            if handler(self):
                return self.value
            if len(self.stack) + self.marked > MAX_STACK_ITEMS:
                raise _refused(f"keeps more than {MAX_STACK_ITEMS:,} values on the unpickler's stack")

    # -- argument bytes

    def _take(self, n: int) -> bytes:
        data = self.frames.read(n)
        if len(data) != n:
            raise _incomplete()
        return data

    def _unpack(self, fmt: struct.Struct):
        return fmt.unpack(self._take(fmt.size))[0]

    def _line(self) -> bytes:
        return self.frames.readline()

    def _argument(self, size: int, decode):
        """A length-prefixed argument: decoded when short enough to be a name, a key or a size; else skipped
        (never read into memory)."""
        if size > MAX_KEPT_TEXT:
            self.frames.skip(size)
            return UNKNOWN
        return decode(self._take(size))

    def _bytes(self, size: int) -> Unknown:
        self.frames.skip(size)
        return UNKNOWN

    # -- the stack

    def push(self, value) -> None:
        self.stack.append(value)

    def pop(self):
        return self.stack.pop()

    def top(self):
        return self.stack[-1]  # IndexError on an empty stack, as in pickle

    def pop_mark(self) -> list:
        items = self.stack
        self.stack = self.metastack.pop()
        self.marked -= len(self.stack)
        return items

    # -- framing and control

    def load_proto(self):
        if self._unpack(U1) > pickle.HIGHEST_PROTOCOL:
            raise _refused("uses a pickle protocol newer than this Python knows")

    def load_frame(self):
        self.frames.load_frame(self._unpack(U8))

    def load_stop(self) -> bool:
        self.value = self.pop()
        return True

    def load_mark(self):
        if len(self.metastack) >= MAX_MARK_DEPTH:
            raise _refused(f"nests structures more than {MAX_MARK_DEPTH:,} levels deep")
        self.metastack.append(self.stack)
        self.marked += len(self.stack)
        self.stack = []

    def load_pop(self):
        if self.stack:
            self.stack.pop()
        else:
            self.pop_mark()  # as pickle does: POP on an empty stack drops the MARK

    def load_pop_mark(self):
        self.pop_mark()

    def load_dup(self):
        self.push(self.top())

    # -- scalars

    def load_none(self):
        self.push(None)

    def load_newtrue(self):
        self.push(True)

    def load_newfalse(self):
        self.push(False)

    def load_int(self):
        line = self._line()
        self.push(False if line == b"00\n" else True if line == b"01\n" else int(line, 0))

    def load_binint(self):
        self.push(self._unpack(I4))

    def load_binint1(self):
        self.push(self._unpack(U1))

    def load_binint2(self):
        self.push(self._unpack(U2))

    def load_long(self):
        digits = self._line()[:-1]
        self.push(int(digits[:-1] if digits.endswith(b"L") else digits, 0))

    def load_long1(self):
        self.push(int.from_bytes(self._take(self._unpack(U1)), "little", signed=True))

    def load_long4(self):
        size = self._unpack(I4)
        if size < 0:
            raise ValueError("LONG4 with a negative byte count")
        self.push(self._argument(size, lambda data: int.from_bytes(data, "little", signed=True)))

    def load_float(self):
        float(self._line()[:-1])
        self.push(UNKNOWN)

    def load_binfloat(self):
        self._take(8)
        self.push(UNKNOWN)

    # -- strings and bytes (py2 str opcodes decode as ASCII, the loaders' default encoding)

    def load_string(self):
        data = self._line()[:-1]
        if len(data) < 2 or data[0] != data[-1] or data[0] not in b"\"'":
            raise ValueError("the STRING opcode argument must be quoted")
        self.push(codecs.escape_decode(data[1:-1])[0].decode("ascii"))

    def load_binstring(self):
        size = self._unpack(I4)
        if size < 0:
            raise ValueError("BINSTRING with a negative byte count")
        self.push(self._argument(size, lambda data: data.decode("ascii")))

    def load_short_binstring(self):
        self.push(self._take(self._unpack(U1)).decode("ascii"))

    def load_unicode(self):
        self.push(self._line()[:-1].decode("raw-unicode-escape"))

    def _utf8(self, size: int):
        self.push(self._argument(size, lambda data: data.decode("utf-8", "surrogatepass")))

    def load_short_binunicode(self):
        self._utf8(self._unpack(U1))

    def load_binunicode(self):
        self._utf8(self._unpack(U4))

    def load_binunicode8(self):
        self._utf8(self._unpack(U8))

    def load_short_binbytes(self):
        self.push(self._bytes(self._unpack(U1)))

    def load_binbytes(self):
        self.push(self._bytes(self._unpack(U4)))

    def load_binbytes8(self):
        self.push(self._bytes(self._unpack(U8)))

    def load_bytearray8(self):
        self.push(self._bytes(self._unpack(U8)))

    def load_next_buffer(self):
        raise _refused("refers to out-of-band pickle buffers, which ServeML's loaders never pass")

    def load_readonly_buffer(self):
        self.top()

    # -- containers. joblib's array wrapper class may only be called through NEWOBJ: anywhere else
    # (an argument of copyreg._reconstructor, a BUILD state, ...) it could become a wrapper the walk
    # does not recognise.

    def _contain(self, items):
        # By identity (_import hands out the one WRAPPER object): `in` would call Global.__eq__ per item.
        if any(map(operator.is_, items, itertools.repeat(WRAPPER))):
            raise _refused("passes joblib's array wrapper class around as a value, which joblib.dump never does")
        return items

    def load_empty_tuple(self):
        self.push(())

    def load_tuple1(self):
        self.stack[-1] = self._contain((self.stack[-1],))

    def load_tuple2(self):
        self.stack[-2:] = [self._contain((self.stack[-2], self.stack[-1]))]

    def load_tuple3(self):
        self.stack[-3:] = [self._contain((self.stack[-3], self.stack[-2], self.stack[-1]))]

    def load_tuple(self):
        items = self._contain(self.pop_mark())
        self.push(_tuple(items))

    def load_empty_list(self):
        self.push(SEQ)

    def load_empty_set(self):
        self.push(SEQ)

    def load_list(self):
        self._contain(self.pop_mark())
        self.push(SEQ)

    def load_frozenset(self):
        self._contain(self.pop_mark())
        self.push(SEQ)

    def load_append(self):
        self._contain([self.pop()])
        self.top()

    def load_appends(self):
        self._contain(self.pop_mark())
        self.top()

    def load_additems(self):
        self._contain(self.pop_mark())
        self.top()

    def load_empty_dict(self):
        self.push(_Dict())

    def load_dict(self):
        items = self._contain(self.pop_mark())
        target = _Dict()
        self._set_items(target, items)
        self.push(target)

    def load_setitem(self):
        value = self.pop()
        key = self.pop()
        self._set_items(self.top(), self._contain([key, value]))

    def load_setitems(self):
        items = self._contain(self.pop_mark())
        self._set_items(self.top(), items)

    def _set_items(self, target, items: list) -> None:
        if len(items) % 2:
            raise IndexError("an odd number of dict items")
        for key, value in zip(items[::2], items[1::2], strict=True):
            if key == SKLEARN_VERSION_KEY and type(value) is str and len(value) <= 64:
                self.result.sklearn_versions.add(value)
            if type(target) is _Dict:
                target.set(key, value)

    # -- the memo

    def _memoize(self, index: int) -> None:
        if index not in self.memo and len(self.memo) >= MAX_MEMO_ENTRIES:
            raise _refused(f"memoizes more than {MAX_MEMO_ENTRIES:,} objects")
        self.memo[index] = self.top()

    def load_put(self):
        index = int(self._line()[:-1])
        if index < 0:
            raise ValueError("negative PUT argument")
        self._memoize(index)

    def load_binput(self):
        self._memoize(self._unpack(U1))

    def load_long_binput(self):
        self._memoize(self._unpack(U4))

    def load_memoize(self):
        self._memoize(len(self.memo))

    def _recall(self, index: int) -> None:
        if index not in self.memo:
            raise _incomplete("it reads a memo slot it never wrote")
        self.push(self.memo[index])

    def load_get(self):
        self._recall(int(self._line()[:-1]))

    def load_binget(self):
        self._recall(self._unpack(U1))

    def load_long_binget(self):
        self._recall(self._unpack(U4))

    # -- imports

    def _import(self, module, name) -> Global:
        if type(module) is not str or type(name) is not str or len(module) + len(name) > MAX_NAME_CHARS:
            raise InspectionError(
                "The model file imports a name that cannot be resolved without running it "
                "(STACK_GLOBAL with computed operands). ServeML refuses such files."
            )
        found = Global(module, name)
        attribute = name.rpartition(".")[2]
        if attribute in ("NDArrayWrapper", "ZNDArrayWrapper"):
            # joblib < 0.10 kept arrays in separate files: loading one unpickles any file on the server.
            raise _refused(
                f"uses joblib's old multi-file array format ({found}), which reads other files on the server",
                "Save the model again with a current joblib.dump.",
            )
        if attribute == "NumpyArrayWrapper":
            if found != WRAPPER:
                raise _refused(f"imports joblib's array wrapper under another name ({found})")
            found = WRAPPER
        self.result.globals.add(found)
        return found

    def load_global(self):
        module = self._line()[:-1].decode("utf-8")
        name = self._line()[:-1].decode("utf-8")
        self.push(self._import(module, name))

    def load_stack_global(self):
        name = self.pop()
        module = self.pop()
        self.push(self._import(module, name))

    def load_inst(self):
        module = self._line()[:-1].decode("ascii")
        name = self._line()[:-1].decode("ascii")
        cls = self._import(module, name)
        self.push(self._call(cls, _tuple(self._contain(self.pop_mark()))))

    def _refuse_ext(self):
        raise _refused(
            "uses the copyreg extension registry (EXT opcodes), which can import arbitrary code",
        )

    load_ext1 = load_ext2 = load_ext4 = _refuse_ext

    def _refuse_persistent(self):
        raise _refused("refers to persistent objects, which ServeML cannot load")

    load_persid = load_binpersid = _refuse_persistent

    # -- calls

    def _call(self, func, args) -> Obj:
        # Calling the wrapper class runs its __init__, which sets attributes no BUILD state shows.
        if func is WRAPPER:
            raise _refused("calls joblib's array wrapper class, which joblib.dump never does")
        return Obj(func, args, called=True)

    def load_obj(self):
        items = self.pop_mark()
        self.push(self._call(items[0], _tuple(self._contain(items[1:]))))

    def load_reduce(self):
        args = self._contain([self.pop()])[0]
        func = self.pop()
        self.push(self._call(func, args))

    def load_newobj(self):
        args = self.pop()
        cls = self.pop()
        self.push(Obj(cls, self._contain([args])[0], called=False))

    def load_newobj_ex(self):
        kwargs = self.pop()
        args = self.pop()
        cls = self.pop()
        self._contain([kwargs])
        self.push(Obj(cls, self._contain([args])[0], called=False))

    def load_build(self):
        state = self._contain([self.pop()])[0]
        target = self.top()
        if type(target) is Global:
            raise _refused(f"changes {target} itself while loading, as no pickle writer does")
        if type(target) is not Obj:
            return
        if target.func is WRAPPER and self.reads_arrays:
            self.stack[-1] = self._read_array(target, state)
            return
        target.state = state
        target.builds += 1

    # -- joblib arrays

    def _read_array(self, wrapper: Obj, state):
        """Read the array joblib wrote after its wrapper, as NumpyArrayWrapper.read_array does."""
        if wrapper.builds:
            raise _refused("builds the same joblib array twice, which joblib.dump never does")
        wrapper.builds = 1
        layout = _ArrayLayout.of(state)
        if layout.has_objects:
            return self._nested_pickle()
        if layout.padded:
            # joblib reads the padding length from the file itself, right after the frame.
            padding = self.source.read(1)
            if not padding or self.source.skip(padding[0]) < padding[0]:
                raise _incomplete()
        if self.source.skip(layout.nbytes) < layout.nbytes:
            raise _incomplete("it ends inside an array")
        return UNKNOWN

    def _nested_pickle(self):
        """An object array: joblib unpickles it from the file with a plain unpickler of its own."""
        inner = _Walker(self.source, self.result, self.budget, reads_arrays=False)
        value = inner.walk()
        if inner.frames.leftover():
            raise _refused("has hidden bytes after the end of an object array's pickle")
        if value is WRAPPER or (type(value) is Obj and value.func is WRAPPER):
            raise _refused("returns a joblib array wrapper from an object array, which joblib.dump never does")
        return value


def _handlers() -> list:
    table = [None] * 256
    for opcode in pickletools.opcodes:
        table[ord(opcode.code)] = getattr(_Walker, "load_" + opcode.name.lower())
    return table


_HANDLERS = _handlers()


# ---------------------------------------------------------------- joblib array layout


WRAPPER_ATTRIBUTES = {"subclass", "shape", "order", "dtype", "allow_mmap", "numpy_array_alignment_bytes"}
DTYPE_CODE = re.compile(r"([biufcmMOSUV])(0|[1-9][0-9]{0,9})")
# Item sizes numpy gives the fixed-size kinds, whatever the dtype state says (on 64-bit platforms).
FIXED_ITEMSIZES = {
    "b": {1: 1},
    "i": {1: 1, 2: 2, 4: 4, 8: 8},
    "u": {1: 1, 2: 2, 4: 4, 8: 8},
    "f": {2: 2, 4: 4, 8: 8, 16: 16},
    "c": {8: 8, 16: 16, 32: 32},
    "M": {8: 8},
    "m": {8: 8},
    "O": {4: 8, 8: 8},
}
NPY_ITEM_HASOBJECT = 0x01


@dataclass(frozen=True)
class _ArrayLayout:
    """How joblib reads one array: padding, then nbytes of data, or a nested pickle for object arrays."""

    padded: bool
    has_objects: bool
    nbytes: int

    @classmethod
    def of(cls, state) -> "_ArrayLayout":
        attributes = _wrapper_attributes(state)
        itemsize, has_objects = _dtype_layout(attributes.get("dtype"))
        count = _element_count(attributes.get("shape"))
        alignment = attributes.get("numpy_array_alignment_bytes")
        # joblib >= 1.2 reads a padding byte iff the attribute is there and not None.
        if alignment is not None and type(alignment) is not int:
            raise _unreadable_array("its alignment cannot be told without running the file")
        if not has_objects and itemsize <= 0:
            raise _unreadable_array(f"its items are {itemsize} bytes long")
        return cls(padded=alignment is not None, has_objects=has_objects, nbytes=count * itemsize)


def _unreadable_array(detail: str) -> InspectionError:
    return _refused(f"holds a joblib array ServeML cannot check: {detail}", "Save the model again with joblib.dump.")


def _wrapper_attributes(state) -> dict:
    # pickle copies a dict state into the wrapper's __dict__; any other key could shadow one of its
    # methods (read, read_array, ...) and change how many bytes joblib reads.
    if type(state) is not _Dict or state.opaque or not set(state.items or ()) <= WRAPPER_ATTRIBUTES:
        raise _unreadable_array("its wrapper's state is not the one joblib.dump writes")
    return state.items or {}


def _dtype_layout(dtype) -> tuple[int, bool]:
    """(itemsize, hasobject) of numpy.dtype(code, False, True) after its one __setstate__, as numpy computes them."""
    if not (type(dtype) is Obj and dtype.func == NUMPY_DTYPE and dtype.called and dtype.builds == 1):
        raise _unreadable_array("its dtype is not built the way numpy pickles one")
    args, state = dtype.args, dtype.state
    # Never str() or repr() these: they are attacker-built structures (a memo-shared tuple doubles per level).
    if not (type(args) is tuple and len(args) == 3 and type(args[0]) is str and args[1] is False and args[2] is True):
        raise _unreadable_array("its dtype is not built the way numpy pickles one")
    match = DTYPE_CODE.fullmatch(args[0])
    if not match:
        raise _unreadable_array("its dtype code is not one numpy writes")
    if not (
        type(state) is tuple
        and len(state) in (8, 9)
        and all(type(state[i]) is int for i in (0, 5, 7))
        and state[0] in (3, 4)
        and -128 <= state[7] < 2**64
    ):
        raise _unreadable_array("its dtype state is not one numpy writes")
    kind, size = match.group(1), int(match.group(2))
    if kind in "SUV":
        itemsize = state[5]  # flexible types take their size from the state
    elif size in FIXED_ITEMSIZES[kind]:
        itemsize = FIXED_ITEMSIZES[kind][size]
    else:
        raise _unreadable_array("its dtype code is not one numpy writes")
    # numpy takes the flags from the state for every kind (a float64 can claim to hold objects).
    return itemsize, bool(state[7] & NPY_ITEM_HASOBJECT)


def _element_count(shape) -> int:
    if type(shape) is not tuple or not all(type(n) is int and n >= 0 for n in shape):
        raise _unreadable_array("its shape is not a tuple of sizes")
    count = 1
    for n in shape:
        count *= n
        if count >= 2**63:
            raise _unreadable_array("it claims more elements than numpy can hold")
    return count


# ---------------------------------------------------------------- skops


def _scan_skops(stream: BinaryIO) -> ScanResult:
    result = ScanResult(format="skops")
    schema = _parse_schema(_read_schema(stream))
    pending, visited = [schema], 0
    # Iterative, so that no depth of nesting can exhaust the interpreter's stack.
    while pending:
        node = pending.pop()
        visited += 1
        if visited > MAX_SCHEMA_NODES:
            raise _skops_refused(f"its schema.json holds more than {MAX_SCHEMA_NODES:,} values")
        if isinstance(node, dict):
            _scan_schema_node(node, result)
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return result


def _skops_refused(detail: str) -> InspectionError:
    return InspectionError(
        f"The skops file is not one ServeML can check: {detail}. ServeML refuses it. "
        "Save the model again with skops.io.dump and upload that file."
    )


def _read_schema(stream: BinaryIO) -> bytes:
    _check_zip_directory(stream)
    try:
        with zipfile.ZipFile(stream) as archive:
            info = archive.getinfo("schema.json")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                # zipfile inflates bz2 and lzma members whole, whatever size is asked for.
                raise _skops_refused(
                    "its schema.json is compressed with bz2 or lzma; save it with the default compression"
                )
            if info.file_size > MAX_SCHEMA_BYTES:
                raise _skops_refused(f"its schema.json is larger than {MAX_SCHEMA_BYTES // MiB} MiB")
            with archive.open(info) as member:
                data = _read_at_most(member, MAX_SCHEMA_BYTES + 1)  # the recorded size may lie
    except InspectionError:
        raise
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        KeyError,
        ValueError,
        OverflowError,
        OSError,
        EOFError,
        zlib.error,
        lzma.LZMAError,
        NotImplementedError,
        RuntimeError,
    ) as exc:
        raise InspectionError(f"The model file is a damaged skops file or not one ({exc}). {REUPLOAD}") from None
    if len(data) > MAX_SCHEMA_BYTES:
        raise _skops_refused(f"its schema.json expands past {MAX_SCHEMA_BYTES // MiB} MiB")
    return data


def _read_at_most(member: BinaryIO, limit: int) -> bytes:
    # In pieces: zipfile inflates as much as one read asks for, whatever the member's recorded size.
    pieces, size = [], 0
    while size < limit and (piece := member.read(min(CHUNK_BYTES, limit - size))):
        pieces.append(piece)
        size += len(piece)
    return b"".join(pieces)


def _check_zip_directory(stream: BinaryIO) -> None:
    """Refuse a zip whose list of members is too long to read: zipfile reads all of it into memory."""
    size = stream.seek(0, io.SEEK_END)
    stream.seek(max(0, size - 22 - 65535))  # the end record, behind a comment of at most 64 KiB
    tail = stream.read()
    stream.seek(0)
    end = tail.rfind(b"PK\x05\x06")
    if end < 0 or len(tail) - end < 22:
        return  # zipfile will call it damaged
    entries, directory_bytes = struct.unpack("<H I", tail[end + 10 : end + 16])
    if entries == 0xFFFF or directory_bytes == 0xFFFFFFFF or directory_bytes > MAX_ZIP_DIRECTORY_BYTES:
        raise _skops_refused("its list of members is larger than any skops file's")


def _parse_schema(data: bytes):
    # Each JSON value costs a few bytes of text but some 50 of memory: count them before parsing.
    if data.count(b"[") + data.count(b"{") + data.count(b",") > MAX_SCHEMA_NODES:
        raise _skops_refused(f"its schema.json holds more than {MAX_SCHEMA_NODES:,} values")
    try:
        return json.loads(data)
    except RecursionError:
        raise _skops_refused("its schema.json is nested too deeply") from None
    except ValueError as exc:  # includes UnicodeDecodeError
        raise InspectionError(f"The model file is a damaged skops file or not one ({exc}). {REUPLOAD}") from None


def _scan_schema_node(node: dict, result: ScanResult) -> None:
    module, cls = node.get("__module__"), node.get("__class__")
    if isinstance(module, str) and isinstance(cls, str):
        result.globals.add(_schema_global(module, cls))
    loader, content = node.get("__loader__"), node.get("content")
    if loader == "FunctionNode" and isinstance(content, dict):
        result.globals.add(_schema_global(content.get("module_path"), content.get("function")))
    elif loader == "MethodNode":
        raise InspectionError("The skops file stores a bound method, which ServeML cannot check statically.")
    version = node.get(SKLEARN_VERSION_KEY)
    if isinstance(version, dict) and isinstance(version.get("content"), str):
        text = version["content"]
        if version.get("is_json"):
            try:
                text = json.loads(text)
            except (ValueError, RecursionError):
                text = None
        if isinstance(text, str) and len(text) <= 64:
            result.sklearn_versions.add(text)


def _schema_global(module, name) -> Global:
    if not isinstance(module, str) or not isinstance(name, str) or len(module) + len(name) > MAX_NAME_CHARS:
        raise _skops_refused("it names a type or function by something other than a short module path and name")
    return Global(module, name)
