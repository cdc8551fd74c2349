"""CSV batch predictions: check an uploaded CSV against a model's signature, then stream
it back predicted in batches with a `prediction` column (and one per class for
probabilities).

Two passes over the upload, which Django has written to a temporary file: `check`
reads it line by line and refuses the whole file with its first errors by line number
before anything is predicted (so a bad file costs no model time and a good one yields
a complete output); `predict_lines` reads it again and yields the output a batch at a
time. Neither holds more than one batch of rows, and no line longer than MAX_LINE_CHARS
is ever read whole.

The upload is someone's spreadsheet: cells are bounded, cells that spreadsheets would
run as formulas are neutralised on the way out (OWASP "CSV injection"), and every
refusal quotes at most a few dozen characters of what it refuses.
"""

import csv
import io
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import IO, Any

import httpx

MAX_ERRORS = 20
MAX_LINE_CHARS = 1024 * 1024
BATCH_BODY_CHARS = 4 * 1024 * 1024  # the runtime refuses bodies over 10 MB
# The last line of an output whose prediction stopped half way; the browser shows it.
STOPPED = "#ServeML error: "

# A plain decimal number: what float() takes minus nan, inf, "1_000" and the like.
NUMBER = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class CsvRefused(ValueError):
    """The file cannot be predicted as it is; `errors` say why, by line number."""

    def __init__(self, errors: list[str], more: int = 0):
        self.errors, self.more = errors, more
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return self.errors + ([f"… and {self.more} more lines with errors."] if self.more else [])


class BatchFailed(Exception):
    """The endpoint did not predict a batch: str(error) says why, for the user. `refused`: it
    answered 400, so the input is at fault (and one row of it can be found), not the endpoint."""

    def __init__(self, message: str, refused: bool = False):
        super().__init__(message)
        self.refused = refused


class Endpoint:
    """A deployment's prediction URL, called with `{"instances": [...]}` a batch at a time."""

    def __init__(self, url: str, headers: dict, timeout: float, transport: httpx.BaseTransport | None = None):
        self.url = url
        self.client = httpx.Client(headers=headers, timeout=timeout, transport=transport)

    def __call__(self, instances: list, method: str) -> list:
        body = {"instances": instances} if method == "predict" else {"instances": instances, "method": method}
        try:
            response = self.client.post(self.url, json=body)
        except httpx.HTTPError as exc:
            raise BatchFailed(f"the endpoint did not answer ({type(exc).__name__}: {str(exc)[:200]}).") from None
        if response.status_code != 200:
            try:
                reason = str(response.json().get("error", ""))[:300]
            except (ValueError, AttributeError):
                reason = response.text[:300]
            raise BatchFailed(
                f"the endpoint answered HTTP {response.status_code}: {reason or response.reason_phrase}",
                refused=response.status_code == 400,
            )
        try:
            predictions = response.json()["predictions"]
        except (ValueError, KeyError, TypeError):
            raise BatchFailed("the endpoint's answer has no predictions list.") from None
        if not isinstance(predictions, list) or len(predictions) != len(instances):
            raise BatchFailed(f"the endpoint answered {len(predictions)} predictions for {len(instances)} rows.")
        return predictions

    def close(self) -> None:
        self.client.close()


@dataclass(frozen=True)
class Layout:
    """How a checked file's columns become the model's input."""

    mode: str  # "numbers" (lists of floats), "records" ({feature: value}) or "text" (one string per row)
    header: list[str] | None  # the file's header row, None when it has none
    names: list[str] | None = None  # records: the file's columns' feature names, in file order
    text_columns: frozenset[int] = field(default_factory=frozenset)  # records: columns passed as strings
    rows: int = 0
    width: int = 0  # values per row

    def instance(self, row: list[str]) -> Any:
        if self.mode == "text":
            return row[0]
        if self.mode == "records":
            return {
                name: (cell if index in self.text_columns else float(cell))
                for index, (name, cell) in enumerate(zip(self.names, row, strict=True))
            }
        return [float(cell) for cell in row]


def is_number(cell: str) -> bool:
    return NUMBER.fullmatch(cell) is not None


def shown(value: str, limit: int = 40) -> str:
    """A user's value quoted in an error: short and on one line."""
    text = value if len(value) <= limit else value[:limit] + "…"
    return repr(text)


def safe_cell(value: Any) -> Any:
    """A cell a spreadsheet will not run as a formula (OWASP): text starting with = + - @ tab or CR
    gets a leading apostrophe. Numbers are left alone, negative ones included."""
    if isinstance(value, str) and value.startswith(FORMULA_START) and not is_number(value):
        return "'" + value
    return value


def lines(binary: IO[bytes], max_line_chars: int = MAX_LINE_CHARS) -> Iterator[str]:
    """The file's physical lines as text, each read with a bound: a longer one stops the read."""
    binary.seek(0)
    text = io.TextIOWrapper(binary, encoding="utf-8-sig", newline="")
    try:
        number = 0
        while True:
            number += 1
            try:
                line = text.readline(max_line_chars + 1)
            except UnicodeDecodeError:
                raise CsvRefused([f"line {number}: the file is not UTF-8 text (save it as CSV UTF-8)."]) from None
            if not line:
                return
            if len(line) > max_line_chars:
                raise CsvRefused([f"line {number}: longer than {max_line_chars:,} characters."])
            yield line
    finally:
        if not binary.closed:
            text.detach()  # the upload stays open for the next pass


def records(binary: IO[bytes], max_lines: int) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) for each non-blank row; a row must sit on one line."""
    source = lines(binary)
    try:
        yield from _rows(csv.reader(source, strict=True), max_lines)
    finally:
        source.close()


def _rows(reader, max_lines: int) -> Iterator[tuple[int, list[str]]]:
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise CsvRefused([f"line {start}: not valid CSV ({exc})."]) from None
        if reader.line_num != start:
            raise CsvRefused([f"line {start}: a quoted value runs over several lines; put each row on one line."])
        if reader.line_num > max_lines:
            raise CsvRefused([f"the file has more than {max_lines:,} lines; split it into smaller files."])
        if row and any(cell.strip() for cell in row):
            yield start, row


def layout(header_row: list[str] | None, signature, example: Any) -> Layout:
    """The columns the model takes, from the file's first row; raises CsvRefused on a header that does not fit."""
    names = signature.feature_names_in
    if signature.input == "text" or (not names and not signature.n_features_in):
        return Layout(mode="text", header=header_row)
    if not names:
        return Layout(mode="numbers", header=header_row)
    if header_row is None:
        header, file_names = None, list(names)
    else:
        header, file_names = header_row, [cell.strip() for cell in header_row]
        errors = []
        unknown = [name for name in file_names if name not in names]
        if unknown:
            errors.append(
                f"line 1: unknown column {', '.join(shown(n) for n in unknown[:5])}"
                f"{' and more' if len(unknown) > 5 else ''}; the model's features are {', '.join(names)}."
            )
        missing = [name for name in names if name not in file_names]
        if missing:
            errors.append(
                f"line 1: missing column {', '.join(missing[:20])}{' and more' if len(missing) > 20 else ''}."
            )
        doubled = sorted({name for name in file_names if file_names.count(name) > 1})
        if doubled:
            errors.append(f"line 1: column {', '.join(shown(n) for n in doubled[:5])} appears more than once.")
        if errors:
            raise CsvRefused(errors)
    kinds = example if isinstance(example, dict) else {}
    text_columns = frozenset(i for i, name in enumerate(file_names) if isinstance(kinds.get(name), str))
    return Layout(mode="records", header=header, names=file_names, text_columns=text_columns)


def row_errors(number: int, row: list[str], lay: Layout, width: int) -> list[str]:
    if len(row) != width:
        return [f"line {number}: expected {width} values, got {len(row)}."]
    if lay.mode == "text":
        return []
    errors = []
    for index, cell in enumerate(row):
        if index in lay.text_columns:
            continue
        if not is_number(cell):
            column = f"column {lay.names[index]}" if lay.names else f"column {index + 1}"
            what = "is empty" if not cell.strip() else f"{shown(cell)} is not a number"
            errors.append(f"line {number}: {column} {what}.")
            break  # one error per line is enough to fix it
    return errors


def check(binary: IO[bytes], signature, example: Any, *, max_lines: int, max_errors: int = MAX_ERRORS) -> Layout:
    """Read the whole file once; the Layout to predict it with, or CsvRefused with its first errors."""
    with closing(records(binary, max_lines)) as rows:
        return _check(rows, signature, example, max_errors)


def _check(rows: Iterator[tuple[int, list[str]]], signature, example: Any, max_errors: int) -> Layout:
    first = next(rows, None)
    if first is None:
        raise CsvRefused(["the file has no rows: the first line is a header, then one row per line."])
    _, first_row = first
    width = signature.n_features_in
    has_header = signature.input == "text" or not all(is_number(cell) for cell in first_row)
    lay = layout(first_row if has_header else None, signature, example)
    if lay.mode == "numbers" and not width:
        width = len(first_row)
    if lay.mode == "text":
        width = 1
    if lay.mode == "records":
        width = len(lay.names)
    errors, more, count = [], 0, 0
    if has_header and len(first_row) != width:
        errors.append(f"line {first[0]}: the header has {len(first_row)} columns; the model takes {width} features.")
    for number, row in rows if has_header else _chain([first], rows):
        count += 1
        found = row_errors(number, row, lay, width)
        if found and len(errors) < max_errors:
            errors += found
        elif found:
            more += 1
    if errors:
        raise CsvRefused(errors, more)
    if not count:
        raise CsvRefused(["the file has a header but no rows to predict."])
    return Layout(
        mode=lay.mode,
        header=lay.header,
        names=lay.names,
        text_columns=lay.text_columns,
        rows=count,
        width=width,
    )


def _chain(*iterables: Iterable) -> Iterator:
    for iterable in iterables:
        yield from iterable


def batches(binary: IO[bytes], lay: Layout, batch_rows: int, max_lines: int) -> Iterator[list[tuple[int, list[str]]]]:
    """The checked file's rows again, in batches of at most batch_rows rows and about BATCH_BODY_CHARS of input."""
    with closing(records(binary, max_lines)) as rows:
        if lay.header is not None:
            next(rows)
        batch, size = [], 0
        for number, row in rows:
            batch.append((number, row))
            size += sum(len(cell) + 4 for cell in row) + (sum(len(n) + 4 for n in lay.names) if lay.names else 0)
            if len(batch) >= batch_rows or size >= BATCH_BODY_CHARS:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch


class _Line:
    """A file-like target for csv.writer that hands back what it was given."""

    def __init__(self):
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        self.parts.append(text)

    def take(self) -> bytes:
        data = "".join(self.parts).encode()
        self.parts.clear()
        return data


def probability_columns(classes: list | None, count: int) -> list[str]:
    if classes and len(classes) == count and all(not isinstance(c, list) for c in classes):
        return [f"probability_{label}" for label in classes]
    return [f"probability_{i}" for i in range(count)]


def predict_lines(
    binary: IO[bytes],
    lay: Layout,
    predict: Callable[[list, str], list],
    *,
    probabilities: bool,
    classes: list | None,
    batch_rows: int,
    max_lines: int,
) -> Iterator[bytes]:
    """The output CSV, a batch at a time: the file's rows with the predictions appended.

    `predict(instances, method)` answers one prediction per instance or raises BatchFailed;
    then the output ends with a STOPPED line saying which lines failed and why."""
    out = _Line()
    writer = csv.writer(out, lineterminator="\n")
    header = lay.header if lay.header is not None else (lay.names or [f"x{i}" for i in range(lay.width)])
    columns = None
    for batch in batches(binary, lay, batch_rows, max_lines):
        instances = [lay.instance(row) for _, row in batch]
        try:
            predicted = predict(instances, "predict")
            chances = predict(instances, "predict_proba") if probabilities else None
        except BatchFailed as exc:
            span, reason = first_refused(batch, instances, predict, exc)
            if columns is None:
                writer.writerow([safe_cell(cell) for cell in header] + ["prediction"])
            yield out.take() + f"{STOPPED}{span}: {reason}\n".encode()
            return
        if columns is None:
            columns = ["prediction"]
            if chances is not None:
                columns += probability_columns(classes, len(chances[0]) if chances and chances[0] else 0)
            writer.writerow([safe_cell(cell) for cell in header + columns])
        for index, ((_, row), prediction) in enumerate(zip(batch, predicted, strict=True)):
            extra = [prediction]
            if chances is not None:
                extra += chances[index] if isinstance(chances[index], list) else [chances[index]]
            # One output line per row: the browser counts lines for its progress bar.
            extra = [
                value.replace("\r", " ").replace("\n", " ") if isinstance(value, str) else value for value in extra
            ]
            writer.writerow([safe_cell(cell) for cell in row] + [safe_cell(value) for value in extra])
        yield out.take()


def first_refused(batch: list, instances: list, predict: Callable, failure: BatchFailed) -> tuple[str, BatchFailed]:
    """Where a failed batch went wrong: the first row the model refuses, found by halving
    (a dozen calls for a batch of thousands), or the whole batch when it is not the input."""
    span = f"line {batch[0][0]}" if len(batch) == 1 else f"lines {batch[0][0]}–{batch[-1][0]}"
    if not failure.refused or len(batch) == 1:
        return span, failure
    low, high = 0, len(batch)  # batch[low:high] holds a refused row
    while high - low > 1:
        middle = (low + high) // 2
        try:
            predict(instances[low:middle], "predict")
        except BatchFailed as exc:
            if not exc.refused:
                return span, failure
            high, failure = middle, exc
        else:
            low = middle
    try:
        predict(instances[low:high], "predict")
    except BatchFailed as exc:
        return f"line {batch[low][0]}", exc
    return span, failure
