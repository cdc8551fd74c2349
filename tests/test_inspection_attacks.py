"""Attacks on the static scan itself, by someone who has read deployments/inspection.py.

Two kinds: files that joblib reads differently from a naive walk of their
opcodes (the scan must list the call joblib runs, or refuse the file), and
files that make the walk itself expensive (each must be refused quickly, in
little memory, with a message for the uploader).

The desync payloads only call builtins.print(marker); the tests that show
joblib.load really runs them do so in a child process.
"""

import io
import pickle
import struct
import time
import tracemalloc
import zipfile

import pytest

from deployments import inspection
from deployments.allowlist import corpus
from deployments.inspection import Global, InspectionError, scan_model_file
from tests import payloads

MARKER = "serveml-desync-marker"
PRINT = Global("builtins", "print")
SECOND = 1.0


def scan(data: bytes):
    return scan_model_file(io.BytesIO(data))


def refusal(data: bytes, match: str = "") -> str:
    """Scan `data`, which must be refused within a second of CPU and 16 MiB of memory; return the message."""
    started = time.process_time()  # CPU time: other work on the machine does not count
    with pytest.raises(InspectionError, match=match) as refused:
        scan(data)
    spent = time.process_time() - started
    assert spent < SECOND, f"took {spent:.2f} s of CPU"
    tracemalloc.start()  # a second run: tracing slows the walk several times over
    try:
        with pytest.raises(InspectionError):
            scan(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024**2, f"used {peak / 1024**2:.0f} MiB"
    message = str(refused.value)
    assert "ServeML" in message or "model file" in message
    return message


# ---------------------------------------------------------------- desync: what joblib runs, the scan sees

LISTS = None  # the scan lists builtins.print
DESYNCS = {
    # joblib >= 1.2 reads alignment padding iff numpy_array_alignment_bytes is set (the old walk: iff allow_mmap).
    "alignment padding without allow_mmap": (payloads.padding_without_mmap, LISTS),
    # numpy sizes a float64 at 8 bytes whatever its dtype state says (the old walk trusted the state's 64).
    "item size in a float64 dtype state": (payloads.itemsize_from_a_fixed_type_state, LISTS),
    # joblib reads the array behind the frame, then the rest of the frame (the old walk ignored frames).
    "opcodes in a frame after an array": (payloads.opcodes_in_a_frame_after_an_array, LISTS),
    # numpy takes hasobject from the dtype state's flags: a nested pickle (the old walk skipped 128 bytes).
    "float64 dtype claiming to hold objects": (payloads.float_array_that_claims_objects, LISTS),
    # an object array's pickle is unpickled plainly (the old walk skipped an array inside it).
    "array wrapper inside an object array": (payloads.wrapper_inside_an_object_array, LISTS),
    # copyreg._reconstructor builds a wrapper joblib reads an array for (the old walk did not).
    "array wrapper built by copyreg._reconstructor": (
        payloads.wrapper_built_through_copyreg,
        "passes joblib's array wrapper class around",
    ),
    # NDArrayWrapper np.load()s the model file itself with pickles allowed, reading it plainly.
    "array read from a file by NDArrayWrapper": (
        lambda marker: payloads.array_read_from_another_file(marker, "model.joblib"),
        "old multi-file array format",
    ),
}


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "zlib"])
@pytest.mark.parametrize("name", DESYNCS)
def test_it_sees_the_call_in_a_file_built_to_desynchronise_the_walk_from_joblib(name, compressed):
    build, refused_with = DESYNCS[name]
    data = build(MARKER)
    if compressed:
        data = payloads.joblib_zlib(data)
    if refused_with is LISTS:
        assert PRINT in scan(data).globals
    else:
        refusal(data, refused_with)


@pytest.mark.parametrize("name", DESYNCS)
def test_joblib_really_runs_the_call_each_desync_file_hides(name, tmp_path):
    # Proof the payloads are real desyncs, not just odd files: joblib.load, in a child process, prints the marker.
    assert MARKER in payloads.joblib_load_output(DESYNCS[name][0](MARKER), tmp_path)


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "zlib"])
def test_it_sees_builtins_exec_hidden_in_a_frame_of_a_working_logistic_regression_file(compressed):
    data = payloads.model_with_a_hidden_call(corpus.logistic_regression(), "print('owned')", "builtins", "exec")
    if compressed:
        data = payloads.joblib_zlib(data)
    result = scan(data)
    assert Global("builtins", "exec") in result.globals
    assert result.format == "joblib" and result.sklearn_version


def test_the_logistic_regression_with_a_hidden_call_still_loads_and_predicts(tmp_path):
    data = payloads.model_with_a_hidden_call(corpus.logistic_regression(), MARKER)
    (tmp_path / "model.joblib").write_bytes(data)
    import subprocess
    import sys

    code = "import sys, joblib; m = joblib.load(sys.argv[1]); print('predicts', m.predict([[5.1, 3.5, 1.4, 0.2]]))"
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "model.joblib")], capture_output=True, text=True, timeout=120
    )
    assert MARKER in done.stdout and "predicts [0]" in done.stdout, done.stderr


def test_it_refuses_a_second_build_of_the_same_array_wrapper():
    # After BUILD the memo still holds the wrapper: a second BUILD would read a second array with merged state.
    create = payloads._global(*payloads.JOBLIB_WRAPPER) + payloads.EMPTY_TUPLE + payloads.NEWOBJ + payloads.MEMOIZE
    data = payloads.PROTO4 + payloads.array_wrapper((1,), payloads.dtype("f8"), create=create)
    data += b"\x00" * 8 + payloads.POP + b"h\x00" + payloads._dict({"shape": payloads._tuple()}) + payloads.BUILD
    refusal(data + b"\x00" * 8 + payloads.STOP, "builds the same joblib array twice")


def test_it_refuses_an_array_wrapper_state_that_shadows_one_of_its_methods():
    # An instance attribute named read_array would replace the method joblib calls to read the bytes.
    wrapper = payloads.array_wrapper((1,), payloads.dtype("f8"), read_array=payloads._global("builtins", "print"))
    refusal(payloads.PROTO4 + wrapper + b"\x00" * 8 + payloads.STOP, "array ServeML cannot check")


def test_it_refuses_an_array_wrapper_imported_under_another_name():
    data = payloads.PROTO4 + payloads._global("joblib", "numpy_pickle.NumpyArrayWrapper") + payloads.STOP
    refusal(data, "array wrapper under another name")


def test_it_refuses_a_file_that_changes_a_class_while_loading():
    # BUILD on a global sets attributes on the class itself (say, a __setstate__ for later objects).
    setattr_state = payloads._tuple(
        payloads.NONE, payloads._dict({"__setstate__": payloads._global("builtins", "exec")})
    )
    data = payloads.PROTO4 + payloads._global("collections", "OrderedDict") + setattr_state + payloads.BUILD
    refusal(data + payloads.STOP, "changes collections.OrderedDict itself")


def test_it_refuses_bytes_hidden_in_the_frame_after_stop():
    data = payloads.PROTO4 + payloads.frame(payloads.NONE + payloads.STOP + payloads.hidden_call(MARKER))
    refusal(data, "more data after the end of the model")


@pytest.mark.parametrize("compression", ["zlib", "gzip", "bz2", "xz", "lz4"])
def test_it_refuses_a_second_compressed_stream_after_the_first(compression):
    benign = pickle.dumps([1, 2, 3], protocol=4)
    hidden = payloads.call("builtins", "print", MARKER)
    data = payloads.compress(compression, benign) + payloads.compress(compression, hidden)
    refusal(data, f"after the end of its {compression}-compressed stream")


def test_it_refuses_garbage_after_a_zlib_stream():
    refusal(payloads.joblib_zlib(pickle.dumps([1], protocol=4)) + b"x", "after the end of its zlib-compressed stream")


# ---------------------------------------------------------------- resource bounds


def test_it_refuses_a_dtype_built_from_a_tuple_shared_through_the_memo_without_printing_it():
    # str() of this 2**40-leaf tuple never returned.
    data = payloads.shared_tuple_dtype(levels=40)
    assert len(data) < 600
    refusal(data, "its dtype is not built the way numpy pickles one")


def test_it_reads_a_thousand_nested_object_arrays_without_recursing():
    # joblib unpickles an object array's pickle plainly, so the walk never goes deeper than one level.
    refusal(payloads.nested_object_arrays(1000), "more data after the end of the model")


@pytest.fixture(scope="module")
def bombs():
    return {compression: payloads.array_bomb(compression) for compression in ["zlib", "gzip", "bz2", "xz", "lz4"]}


@pytest.mark.parametrize("compression", ["zlib", "gzip", "bz2", "xz", "lz4"])
def test_it_refuses_a_decompression_bomb_within_a_second(bombs, compression):
    # The file declares a 1 GiB array and holds 64 MiB of zeros: over the 32 MiB a small file may expand to.
    message = refusal(bombs[compression], "decompression bomb")
    assert "save it without compression" in message


def test_it_refuses_a_bz2_bomb_of_a_few_hundred_bytes_within_a_second(bombs):
    assert len(bombs["bz2"]) < 1000
    refusal(bombs["bz2"], "expands to more than 32 MiB")


@pytest.mark.parametrize("compression", ["zlib", "bz2"])
def test_it_refuses_a_compressed_file_of_millions_of_tiny_opcodes_within_a_second(compression):
    # NONE, POP, two million times: no memory grows, but the walk would be busy for seconds.
    data = payloads.compress(compression, payloads.PROTO4 + (payloads.NONE + payloads.POP) * (1 << 20))
    refusal(data, "runs more than")


def test_it_refuses_a_pickle_nested_deeper_than_any_real_one():
    refusal(payloads.PROTO4 + b"(" * 20_000 + payloads.STOP, "nests structures more than 10,000 levels deep")


def test_it_walks_deeply_nested_tuples_without_recursing():
    result = scan(payloads.PROTO4 + payloads.NONE + payloads.TUPLE1 * 200_000 + payloads.STOP)
    assert result.globals == set()


def test_it_caps_the_values_kept_on_the_stack(monkeypatch):
    monkeypatch.setattr(inspection, "MAX_STACK_ITEMS", 1000)
    refusal(payloads.PROTO4 + payloads.NONE * 1001 + payloads.STOP, "more than 1,000 values on the unpickler's stack")


def test_it_caps_the_memo(monkeypatch):
    monkeypatch.setattr(inspection, "MAX_MEMO_ENTRIES", 1000)
    refusal(payloads.PROTO4 + payloads.NONE + payloads.MEMOIZE * 1001 + payloads.STOP, "memoizes more than 1,000")


@pytest.mark.parametrize(
    "opcode", [b"\x8e", b"\x8d", b"\x96", b"\x95"], ids=["BINBYTES8", "BINUNICODE8", "BYTEARRAY8", "FRAME"]
)
def test_it_never_allocates_the_length_a_opcode_declares(opcode, tmp_path):
    # A real file, as uploads are: BufferedReader.read(2**60) would try to allocate it all at once.
    path = tmp_path / "model.pkl"
    path.write_bytes(payloads.PROTO4 + opcode + struct.pack("<Q", 2**60) + b"x" * 100)
    with path.open("rb") as handle:
        started = time.process_time()
        with pytest.raises(InspectionError):
            scan_model_file(handle)
        assert time.process_time() - started < SECOND


def test_it_never_allocates_the_length_a_long4_declares():
    refusal(payloads.PROTO4 + b"\x8b" + struct.pack("<i", 2**31 - 1) + b"\x01" * 100, "not a complete pickle")


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2**40, 2**40), "more elements than numpy can hold"),
        ((-1,), "shape is not a tuple of sizes"),
        ((2**30, 2**30 - 1), "ends inside an array"),  # fits int64; the file just is not that long
    ],
)
def test_it_refuses_an_array_of_impossible_shape(shape, match):
    shape_bytes = payloads._tuple(*(b"\x8a\x08" + n.to_bytes(8, "little", signed=True) for n in shape))  # LONG1
    wrapper = payloads.array_wrapper(shape_bytes, payloads.dtype("f8"))
    refusal(payloads.PROTO4 + wrapper + b"\x00" * 64 + payloads.STOP, match)


@pytest.mark.parametrize("code, itemsize", [("S5", 0), ("S5", -4), ("V8", -1)])
def test_it_refuses_an_array_whose_items_have_no_size(code, itemsize):
    wrapper = payloads.array_wrapper((4,), payloads.dtype(code, itemsize=itemsize))
    refusal(payloads.PROTO4 + wrapper + payloads.STOP, "items are")


def test_it_ignores_a_scikit_learn_version_too_long_to_be_one():
    data = pickle.dumps({"_sklearn_version": "9" * 5000}, protocol=4)
    assert scan(data).sklearn_version is None


@pytest.mark.parametrize("error", [MemoryError, RecursionError])
def test_it_reports_running_out_of_memory_or_stack_as_a_refusal(monkeypatch, error):
    def fail(self):
        raise error()

    monkeypatch.setattr(inspection._Walker, "walk", fail)
    with pytest.raises(InspectionError, match="ServeML refuses it"):
        scan(pickle.dumps([1], protocol=4))


# ---------------------------------------------------------------- skops


def skops_file(schema: bytes, compress_type=zipfile.ZIP_DEFLATED) -> bytes:
    """A skops file (a zip) whose schema.json is `schema`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(zipfile.ZipInfo("schema.json"), schema, compress_type=compress_type)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def skops_bomb() -> bytes:
    # zipfile inflates a bz2 member whole, whatever size is asked for: 64 MiB here, 2 GiB from 1.7 KB as easily.
    return skops_file(b'{"a": "' + b" " * (64 << 20) + b'"}', zipfile.ZIP_BZIP2)


def test_it_refuses_a_skops_schema_bomb_within_a_second(skops_bomb):
    assert len(skops_bomb) < 2000
    refusal(skops_bomb, "compressed with bz2 or lzma")


def test_it_refuses_a_skops_schema_larger_than_16_mib():
    refusal(skops_file(b'{"a": "' + b" " * (17 << 20) + b'"}'), "larger than 16 MiB")


def test_it_refuses_a_skops_schema_whose_recorded_size_lies():
    data = bytearray(skops_file(b'{"a": "' + b" " * (17 << 20) + b'"}'))
    # Claim 100 bytes, in the local header and the central directory alike.
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(signature)
        data[at + offset : at + offset + 4] = struct.pack("<I", 100)
    refusal(bytes(data), "damaged skops file|expands past")


def test_it_refuses_a_deeply_nested_skops_schema_without_a_recursion_error():
    data = skops_file(b"[" * 100_000 + b"]" * 100_000)
    assert len(data) < 1000
    refusal(data, "nested too deeply")


def test_it_refuses_a_skops_function_named_by_something_other_than_strings():
    schema = b'{"__loader__": "FunctionNode", "content": {"module_path": [[[["os"]]]], "function": "system"}}'
    refusal(skops_file(schema), "names a type or function by something other than")


def test_it_refuses_a_skops_zip_whose_member_list_is_huge():
    data = bytearray(skops_file(b"{}"))
    end = data.rfind(b"PK\x05\x06")
    data[end + 12 : end + 16] = struct.pack("<I", 64 << 20)  # the central directory's size
    refusal(bytes(data), "list of members")


def test_it_still_reads_the_version_of_a_real_skops_file():
    import sklearn
    import skops.io

    result = scan(skops.io.dumps(corpus.logistic_regression()))
    assert result.format == "skops" and result.sklearn_version == sklearn.__version__


def test_a_zlib_stream_with_a_bad_checksum_is_damaged():
    data = bytearray(payloads.joblib_zlib(pickle.dumps([1, 2, 3], protocol=4)))
    data[-1] ^= 0xFF
    with pytest.raises(InspectionError, match="damaged"):
        scan(bytes(data))
