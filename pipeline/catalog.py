"""Parse a product catalogue: an image file glob or a manifest (CSV, JSONL, Parquet).

Plain library code (the bottom layer: no Beam graph code), shared by the run's
read stage (``transforms/read_catalog.py`` wraps :class:`ManifestRowReader` in a
DoFn), the evaluation, the report and the autoencoder's training set, so all of
them read a catalogue by the same rules.

The catalogue is checked once at start-up (:func:`inspect_catalog`), so an
empty or unusable manifest is one clear message before any worker starts; the
rows themselves are read inside the pipeline, so a catalogue of millions of
rows never passes through the launcher's memory.

Each row becomes a :class:`pipeline.records.CatalogRow`: ``product_id``,
``image`` (resolved: an absolute or FileSystems path, or an http(s) URL),
``row_number`` (0-based position in the manifest; ``None`` for globs) and
``extra`` (the other manifest columns). A row that cannot be used (no id, no
image, bad encoding, invalid JSON, an id the rule of :mod:`pipeline.product_ids`
refuses, a broken CSV record) is still emitted, with ``invalid`` set to
``(reason, message)``, so that it is counted and ends in the errors output
instead of vanishing.

Each manifest file is read by one reader call, start to end, streaming: CSV by
:mod:`pipeline.csv_records` (RFC 4180, multi-line quoted cells, a recovery rule
for broken quotes that accounts for every physical line), JSONL line by line
(split on ``\n`` only, never on Unicode line breaks), Parquet batch by batch
with string columns read as bytes and decoded per cell, so one cell of invalid
UTF-8 is one error row rather than a failed read.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.csv_records import CsvHeaderError, CsvReader
from pipeline.features import FEATURE_COLUMNS
from pipeline.locations import location_scheme
from pipeline.product_ids import (
    InvalidValue,
    clean_text,
    has_surrogate,
    image_from,
    printable,
    product_id_from,
)
from pipeline.records import CatalogRow

MANIFEST_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}

# Columns the pipeline writes itself; a manifest column of the same name is
# carried as ``manifest_<name>`` so it cannot overwrite them.
RESERVED_COLUMNS = FEATURE_COLUMNS

class CatalogError(ValueError):
    """The catalogue as a whole cannot be used (missing, empty, wrong columns)."""


@dataclass(frozen=True)
class CatalogInfo:
    """What start-up learned about the catalogue; travels to the workers."""

    input: str
    kind: str  # "glob", "csv", "jsonl" or "parquet"
    id_column: str = "product_id"
    image_column: str = "image"
    # (manifest column, output column, arrow type as string) of each carried column.
    carried: tuple = field(default_factory=tuple)
    # Column of precomputed vectors (--embedding_column): the image column is optional.
    embedding_column: str | None = None

    def carried_schema_fields(self) -> list:
        """The Parquet fields of the carried columns, in manifest order."""
        return [pa.field(out, _type_from_string(type_str)) for _, out, type_str in self.carried]

    def feature_column(self, manifest_column: str | None) -> str | None:
        """The feature column that carries ``manifest_column`` (None for None or not carried).

        The launcher names columns as the user does (``--partition_by=category``); the
        stages read them from ``features/``, where a name may be prefixed
        (``manifest_<name>``) so it cannot overwrite the pipeline's own columns.
        """
        for name, out, _ in self.carried:
            if manifest_column is not None and name == manifest_column:
                return out
        return None

    def manifest_column(self, feature_column: str | None) -> str | None:
        """The manifest column carried as ``feature_column``: :meth:`feature_column` reversed."""
        for name, out, _ in self.carried:
            if feature_column is not None and out == feature_column:
                return name
        return None


def manifest_kind(path: str) -> str | None:
    """The manifest format of ``path`` by its suffix, or None for an image glob."""
    lower = path.lower()
    for suffix, kind in MANIFEST_SUFFIXES.items():
        if lower.endswith(suffix):
            return kind
    return None


def resolve_image(value: str, manifest_dir: str | None) -> str:
    """Turn an image column value into a location the reader can open.

    URLs and paths with a scheme (``gs://``…) or an absolute path are kept;
    a relative path is taken relative to the manifest's directory, as a shop's
    export of ``images/123.jpg`` next to ``catalog.csv`` expects.
    """
    if "://" in value or value.startswith("/") or manifest_dir is None or location_scheme(value):
        return value  # "data:…", "mailto:…" have a scheme too: not a relative file name
    if "://" in manifest_dir:
        return posixpath.join(manifest_dir, value)
    # What FileSystems.join does locally, at less cost per row (bench/MEASUREMENTS.md,
    # "Local paths and reads").
    return os.path.join(manifest_dir, value)


def _manifest_dir(path: str) -> str:
    if "://" in path:
        return posixpath.dirname(path)
    return os.path.dirname(os.path.abspath(path))


def _type_from_string(type_str: str) -> pa.DataType:
    return pa.string() if type_str == "string" else _ARROW_TYPES[type_str]


_ARROW_TYPES = {
    str(t): t
    for t in (pa.string(), pa.large_string(), pa.int8(), pa.int16(), pa.int32(), pa.int64(),
              pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64(), pa.float32(), pa.float64(),
              pa.bool_(), pa.date32(), pa.timestamp("s"), pa.timestamp("ms"),
              pa.timestamp("us"), pa.timestamp("ns"))
}


def _carried(columns: list[tuple[str, str]], id_column: str, image_column: str,
             embedding_column: str | None = None) -> tuple:
    carried = []
    taken = {id_column, image_column}
    for name, type_str in columns:
        if name in (id_column, image_column, embedding_column):
            continue
        # A JSON key with a lone surrogate cannot name a Parquet column: repaired to U+FFFD
        # (and skipped if that collides with a column already carried).
        out = clean_text(f"manifest_{name}" if name in RESERVED_COLUMNS else name)
        if out in taken:
            continue
        taken.add(out)
        carried.append((name, out, type_str if type_str in _ARROW_TYPES else "string"))
    return tuple(carried)


def _require_columns(path: str, columns: list[str], id_column: str, image_column: str) -> None:
    missing = [c for c in (id_column, image_column) if c not in columns]
    if missing:
        raise CatalogError(
            f"manifest {path} has no column {', '.join(repr(m) for m in missing)}; its columns "
            f"are {columns}. Name the right ones with --id_column / --image_column.")


def inspect_catalog(input_path: str, id_column: str = "product_id",
                    image_column: str = "image",
                    embedding_column: str | None = None) -> CatalogInfo:
    """Check the catalogue is usable and learn its kind and carried columns.

    Raises :class:`CatalogError` with one sentence a person can act on when
    the manifest is missing, empty, lacks the id or image column, or when a
    glob matches no file.
    """
    kind = manifest_kind(input_path)
    if kind is None:
        try:
            matched = FileSystems.match([input_path], limits=[1])[0].metadata_list
        except Exception as exc:  # noqa: BLE001 - any filesystem error is the same user error
            raise CatalogError(f"cannot list {input_path}: {exc}") from exc
        if not matched:
            raise CatalogError(f"no file matches the input glob {input_path}")
        return CatalogInfo(input=input_path, kind="glob")

    if not FileSystems.exists(input_path):
        raise CatalogError(f"manifest {input_path} does not exist")
    try:
        if kind == "parquet":
            with FileSystems.open(input_path) as handle:
                parquet = pq.ParquetFile(pa.PythonFile(handle, mode="r"))
                schema = parquet.schema_arrow
                n_rows = parquet.metadata.num_rows
            columns = [(f.name, str(f.type)) for f in schema]
        elif kind == "csv":
            with FileSystems.open(input_path) as handle:
                reader = CsvReader(handle)
                columns = [(n, "string") for n in reader.columns]
                n_rows = 0 if next(iter(reader), None) is None else 1
        else:
            columns, n_rows = _jsonl_columns(input_path)
    except CatalogError:
        raise
    except CsvHeaderError as exc:
        raise CatalogError(f"manifest {input_path}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - report any parse failure as one sentence
        raise CatalogError(f"cannot read manifest {input_path}: {exc}") from exc
    names = [c for c, _ in columns]
    if not names and n_rows == 0:
        raise CatalogError(f"manifest {input_path} is empty")
    _require_columns(input_path, names, id_column, embedding_column or image_column)
    if n_rows == 0:
        raise CatalogError(f"manifest {input_path} has a header but no rows")
    return CatalogInfo(input=input_path, kind=kind, id_column=id_column,
                       image_column=image_column,
                       carried=_carried(columns, id_column, image_column, embedding_column),
                       embedding_column=embedding_column)


def _jsonl_columns(path: str) -> tuple[list[tuple[str, str]], int]:
    """Union of keys over the JSONL rows (in first-seen order) and the row count."""
    names: dict[str, None] = {}
    n_rows = 0
    with FileSystems.open(path) as handle:
        for line in handle:
            if not line.strip():
                continue
            n_rows += 1
            try:  # decoded as the reader does, so a bad byte costs its row, not the keys
                obj = json.loads(line.decode("utf-8", errors="surrogateescape").lstrip("\ufeff"))
            except ValueError:
                continue
            if isinstance(obj, dict):
                names.update(dict.fromkeys(obj))
    return [(n, "string") for n in names], n_rows


def _cell_to_text(value) -> str | None:
    """A carried cell as text (repaired to valid Unicode), or None."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return clean_text(value)
    return clean_text(json.dumps(value, ensure_ascii=False, sort_keys=True, default=str))


class _Undecodable:
    """Marks a Parquet cell whose text is not valid UTF-8 (in a nested column)."""


_UNDECODABLE = _Undecodable()


def _shown_text(value):
    """What an error row names as the id or image: text kept as read, else None."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value) if abs(value) < 10 ** 600 else None
    if not isinstance(value, str) or has_surrogate(value):
        return None
    return value.strip(" \t\r\n\f\v")


class ManifestRowReader:
    """Stream the rows of one manifest file as :class:`CatalogRow` records, one file per call.

    Why a class: the vectors reader (``transforms/read_vectors.py``) reads the
    same rows with its own Parquet batch reader, by overriding
    :meth:`_parquet_rows`; the pipeline's DoFn is this reader with ``process``.
    """

    def __init__(self, info: CatalogInfo):
        self._info = info

    def rows(self, path: str) -> Iterator[CatalogRow]:
        """Every row of the manifest ``path`` (usable or not, with ``invalid``), in file order."""
        base = _manifest_dir(path)
        readers = {"csv": self._csv_rows, "jsonl": self._jsonl_rows, "parquet": self._parquet_rows}
        for row_number, (where, raw) in enumerate(readers[self._info.kind](path)):
            yield self._to_row(row_number, where, raw, base)

    def _to_row(self, row_number: int, where: str, raw, base: str) -> CatalogRow:
        info = self._info
        if isinstance(raw, tuple):  # (reason, message): the record itself was unusable
            return CatalogRow(None, None, row_number, {}, invalid=raw)
        invalid = None
        id_cell, image_cell = raw.get(info.id_column), raw.get(info.image_column)
        product_id = image = None
        try:
            if id_cell is _UNDECODABLE or image_cell is _UNDECODABLE:
                raise InvalidValue("invalid_utf8", "the id or image is not valid UTF-8")
            product_id = product_id_from(id_cell)
        except InvalidValue as exc:
            if exc.reason == "missing_product_id":
                message = f"{where} has no {info.id_column}"
            else:
                message = f"{where}: {exc.message}"
            invalid = (exc.reason, message)
            product_id = _shown_text(id_cell)
        try:
            image = resolve_image(image_from(image_cell), base)
        except InvalidValue as exc:
            if exc.reason == "missing_image" and info.embedding_column:
                pass  # a row of precomputed vectors needs no image
            elif invalid is None:
                invalid = (exc.reason, f"{where} has no {info.image_column}"
                           if exc.reason == "missing_image" else f"{where}: {exc.message}")
            image = _shown_text(image_cell)
        extra = {}
        for name, out, type_str in info.carried:
            value = raw.get(name)
            if value is _UNDECODABLE:
                value = None
                if invalid is None:
                    invalid = ("invalid_utf8", f"{where}: the column {printable(name)} holds "
                               "text that is not valid UTF-8")
            elif isinstance(value, (bytes, str)) or (type_str == "string" and value is not None):
                value = _cell_to_text(value)
            extra[out] = value
        vector = raw.get(info.embedding_column) if info.embedding_column else None
        return CatalogRow(product_id, image, row_number, extra, invalid, vector)

    def _csv_rows(self, path: str):
        # One serial, streaming RFC 4180 reader per file (see pipeline.csv_records):
        # cells stay text with undecodable bytes marked, so one row with broken
        # encoding is one error row; a broken record is one error row per line.
        with FileSystems.open(path) as handle:
            reader = CsvReader(handle)
            names = reader.columns
            for record in reader:
                where = f"manifest line {record.line}"
                if record.problem is not None:
                    yield where, record.problem
                else:
                    # a record without a problem has its cells
                    yield where, dict(zip(names, record.cells or []))

    def _jsonl_rows(self, path: str):
        # Iterating a binary handle splits on b"\n" only: a U+2028 or U+0085 in a
        # value is part of its line, as JSON says.
        with FileSystems.open(path) as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"manifest line {line_number}"
                text = line.decode("utf-8", errors="surrogateescape")
                if line_number == 1:
                    text = text.lstrip("\ufeff")
                try:
                    obj = json.loads(text)
                except ValueError as exc:
                    yield where, ("invalid_json", f"{where} is not valid JSON: {exc}")
                    continue
                if not isinstance(obj, dict):
                    yield where, ("invalid_json", f"{where} is not a JSON object")
                    continue
                yield where, obj

    def _parquet_rows(self, path: str):
        info = self._info
        wanted = {info.id_column, info.image_column, *(name for name, _, _ in info.carried)}
        with FileSystems.open(path) as handle:
            parquet = pq.ParquetFile(pa.PythonFile(handle, mode="r"))
            row_number = 0
            for batch in parquet.iter_batches(batch_size=10_000):
                columns = {name: _column_values(column)
                           for name, column in zip(batch.schema.names, batch.columns)
                           if name in wanted}
                for index in range(batch.num_rows):
                    row_number += 1
                    yield (f"manifest row {row_number}",
                           {name: values[index] for name, values in columns.items()})


def _column_values(column: pa.Array) -> list:
    """A Parquet column's Python values; text columns as bytes, decoded later per cell.

    ``to_pylist`` of a string column with one invalid UTF-8 cell raises for the
    whole batch; viewing the same buffers as binary reads every cell, and the
    row reader decides per cell (refuse the id, repair a carried value).
    Nested columns fall back to cell by cell, marking the undecodable ones.
    """
    kind = column.type
    if pa.types.is_string(kind):
        return column.view(pa.binary()).to_pylist()
    if pa.types.is_large_string(kind):
        return column.view(pa.large_binary()).to_pylist()
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        values = []
        for index in range(len(column)):
            try:
                values.append(column[index].as_py())
            except UnicodeDecodeError:
                values.append(_UNDECODABLE)
        return values
