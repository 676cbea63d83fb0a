"""RFC 4180 CSV records from a byte stream, read serially, with a recovery rule for bad quotes.

Why serial: a quoted cell may hold line breaks (a shop export's HTML
description does), so whether a newline ends a row depends on every quote
before it. A reader that splits the file into blocks and parses them in
parallel cannot know, at a block boundary, whether it is inside quotes without
scanning from the start (pyarrow's block reader gets out of sync or, told
``newlines_in_values``, still cannot recover from a stray quote). So each
manifest file is read start to end by one reader — Python's ``csv`` module,
strict RFC 4180 quoting, over a streamed text decoding of the bytes — and rows
are emitted as they are parsed; memory holds one record at a time.
``bench/csv_manifest.py`` measures the speed.

Text: UTF-8 (a leading BOM is skipped). Bytes that are not UTF-8 are kept as
``surrogateescape`` code points (U+DC80–U+DCFF), so the one cell holding them
can be refused or repaired by the caller and the rest of the row and file read
on. Physical lines end at LF, CR or CRLF outside quotes; inside quotes they are
part of the cell. Blank lines are skipped.

Recovery rule. A record that cannot be a row is one :class:`CsvRecord` with a
``problem`` for its **first physical line**, and every later line it had taken
is read again as the start of a new record, so no row is ever merged into
another and every physical line ends as a row or an error:

- ``unterminated_quote``: a quoted cell opened in the record is never closed
  before the end of the file, runs past :data:`MAX_RECORD_LINES` physical lines
  or :data:`MAX_CELL_CHARS` characters, or is followed on a later line by a
  character other than a comma or line end (its closing quote was really the
  opening quote of a later cell), or the record spans several lines and has
  the wrong number of cells (a stray quote swallowed the next rows).
- ``malformed_csv_row``: a one-line record with the wrong number of cells, or
  with a quote in the wrong place (``a,"b"c``).

Because a cell that ran away from its opening quote ends at the next quote
character, the lines read again hold no quote until the line where it ended,
so a file is parsed at most about twice whatever its stray quotes.

A valid RFC 4180 file whose stray quote happens to close exactly at a line end
with the right number of cells is indistinguishable from a real multi-line cell
and is read as one; an id or image cell holding a line break is refused by the
id rule (:mod:`pipeline.product_ids`), so such a merge can only ever reach a
carried column.
"""

from __future__ import annotations

import csv
import io
from collections import deque
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from pipeline.product_ids import has_surrogate, printable

# A quoted cell may span at most this many physical lines / characters.
MAX_RECORD_LINES = 10_000
MAX_CELL_CHARS = 8 << 20
_SHOWN = 200  # characters of a broken line quoted in its error message


class CsvHeaderError(ValueError):
    """The header line is missing, unusable or not valid UTF-8."""


@dataclass(frozen=True)
class CsvRecord:
    """One record: its first physical line (1-based) and its cells, or why it has none."""

    line: int
    cells: list | None = None
    problem: tuple | None = None  # (reason, sentence)


def _raise_field_limit() -> None:
    # The csv module's cell limit is process-wide; only ever raise it.
    if csv.field_size_limit() < MAX_CELL_CHARS:
        csv.field_size_limit(MAX_CELL_CHARS)


def text_stream(binary: BinaryIO) -> io.TextIOBase:
    """Decode ``binary`` as UTF-8 (BOM skipped, bad bytes kept as surrogates), lines as is."""
    if not isinstance(binary, io.BufferedIOBase) and not hasattr(binary, "read1"):
        binary = io.BufferedReader(binary)  # type: ignore[type-var]  # a raw stream
    return io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape",
                            newline="")


def _read_again(lines: list) -> str:
    """The clause of an error message that says which lines are read again."""
    if len(lines) < 2:
        return ""
    if len(lines) == 2:
        return f"; line {lines[1][0]} is read again as a row of its own"
    return f"; lines {lines[1][0]}–{lines[-1][0]} are read again as rows of their own"


def _shown(text: str) -> str:
    return printable(text.rstrip("\r\n"), _SHOWN)


class CsvReader:
    """Iterate a CSV byte stream: :attr:`columns` (the header), then :class:`CsvRecord` s.

    Records whose cell count differs from the header's are reported with a
    problem, as are broken quotes (see the module's recovery rule).
    """

    def __init__(self, binary: BinaryIO, max_record_lines: int = MAX_RECORD_LINES):
        _raise_field_limit()
        self._lines = enumerate(text_stream(binary), start=1)
        self._pending: deque = deque()  # (number, text) to read again
        self._max_lines = max_record_lines
        self._records = self._parse()
        self.columns = self._header()

    def _header(self) -> list[str]:
        for record in self._records:
            if record.problem is not None:
                raise CsvHeaderError(f"its header line {record.line} cannot be parsed: "
                                     f"{record.problem[1]}")
            cells = record.cells or []  # a record without a problem has its cells
            if any(has_surrogate(name) for name in cells):
                raise CsvHeaderError(f"its header line {record.line} is not valid UTF-8")
            seen = set()
            for name in cells:
                if name in seen:
                    raise CsvHeaderError(f"its header names the column {name!r} twice")
                seen.add(name)
            return list(cells)
        return []

    def __iter__(self) -> Iterator[CsvRecord]:
        expected = len(self.columns)
        for record in self._records:
            cells = record.cells or []
            if record.problem is None and len(cells) != expected:
                record = CsvRecord(record.line, problem=(
                    "malformed_csv_row",
                    f"manifest line {record.line} has {len(cells)} cells where the header "
                    f"has {expected} (unquoted comma?): {_shown(','.join(cells))}"))
            yield record

    def _parse(self) -> Iterator[CsvRecord]:
        """Records by strict RFC 4180, restarting after each broken one (the recovery rule)."""
        span: list = []  # (number, text) of the physical lines the current record took
        state = {"limited": False}
        expected = None  # cell count of the header, known after the first record

        def feed() -> Iterator[str]:
            while True:
                if len(span) >= self._max_lines:
                    state["limited"] = True  # the reader wants more: a cell is still open
                    return
                if self._pending:
                    item = self._pending.popleft()
                else:
                    item = next(self._lines, None)
                    if item is None:
                        return
                span.append(item)
                yield item[1]

        while True:
            state["limited"] = False
            reader = csv.reader(feed(), strict=True)
            while True:
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    failed = list(span)
                    span.clear()
                    if not failed:  # nothing taken: only possible at the very end
                        return
                    yield self._broken(failed, str(exc), state["limited"])
                    self._pending.extendleft(reversed(failed[1:]))
                    break  # a fresh reader: the old one's state is unusable
                taken = list(span)
                span.clear()
                if not cells:  # a blank line
                    continue
                if expected is None:
                    expected = len(cells)
                elif len(taken) > 1 and len(cells) != expected:
                    # A quote swallowed the following rows: read them again on their own.
                    yield CsvRecord(taken[0][0], problem=(
                        "unterminated_quote",
                        f"manifest line {taken[0][0]}: a quoted cell opened here runs over "
                        f"{len(taken)} lines and leaves the row with {len(cells)} cells where "
                        f"the header has {expected}{_read_again(taken)}: {_shown(taken[0][1])}"))
                    self._pending.extendleft(reversed(taken[1:]))
                    break
                yield CsvRecord(taken[0][0], cells=cells)

    def _broken(self, failed: list, error: str, limited: bool) -> CsvRecord:
        first = failed[0][0]
        shown = _shown(failed[0][1])
        again = _read_again(failed)
        if limited:
            return CsvRecord(first, problem=(
                "unterminated_quote",
                f"manifest line {first}: a quoted cell opened here is not closed within "
                f"{self._max_lines} lines{again}: {shown}"))
        if "unexpected end of data" in error:
            return CsvRecord(first, problem=(
                "unterminated_quote",
                f"manifest line {first}: a quoted cell opened here is not closed before the "
                f"end of the file{again}: {shown}"))
        if "field larger than field limit" in error:
            return CsvRecord(first, problem=(
                "unterminated_quote",
                f"manifest line {first}: a cell starting here is longer than "
                f"{MAX_CELL_CHARS} characters (an unclosed quote?){again}: {shown}"))
        if len(failed) > 1:
            return CsvRecord(first, problem=(
                "unterminated_quote",
                f"manifest line {first}: a quoted cell opened here closes on line "
                f"{failed[-1][0]} and is followed by text, not a comma ({error}){again}: "
                f"{shown}"))
        return CsvRecord(first, problem=(
            "malformed_csv_row",
            f"manifest line {first} has a quote in the wrong place ({error}); a quote inside "
            f"a quoted cell must be doubled: {shown}"))

