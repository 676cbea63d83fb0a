"""Read a product catalogue: an image file glob or a manifest (CSV, JSONL, Parquet).

The catalogue is checked once at start-up (:func:`inspect_catalog`), so an
empty or unusable manifest is one clear message before any worker starts; the
rows themselves are read inside the pipeline (:class:`ReadCatalog`), so a
catalogue of millions of rows never passes through the launcher's memory.

Each row becomes a dict: ``product_id``, ``image`` (resolved: an absolute or
FileSystems path, or an http(s) URL), ``row_number`` (0-based position in the
manifest; ``None`` for globs) and ``extra`` (the other manifest columns). A row
that cannot be used (no id, no image, bad encoding, invalid JSON) is still
emitted, with ``invalid`` set to ``(reason, message)``, so that it is counted
and ends in the errors output instead of vanishing.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Iterator

import apache_beam as beam
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

MANIFEST_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}

# Columns the pipeline writes itself; a manifest column of the same name is
# carried as ``manifest_<name>`` so it cannot overwrite them.
RESERVED_COLUMNS = ("product_id", "image", "embedding", "model", "sha256", "width", "height",
                    "etag", "last_modified")

_CSV_BLOCK_BYTES = 8 << 20
_URL_SCHEMES = ("http://", "https://")


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


def manifest_kind(path: str) -> str | None:
    """The manifest format of ``path`` by its suffix, or None for an image glob."""
    lower = path.lower()
    for suffix, kind in MANIFEST_SUFFIXES.items():
        if lower.endswith(suffix):
            return kind
    return None


def is_url(value: str) -> bool:
    """Whether an image location is an http(s) URL (fetched rather than read)."""
    return value.lower().startswith(_URL_SCHEMES)


def resolve_image(value: str, manifest_dir: str | None) -> str:
    """Turn an image column value into a location the reader can open.

    URLs and paths with a scheme (``gs://``…) or an absolute path are kept;
    a relative path is taken relative to the manifest's directory, as a shop's
    export of ``images/123.jpg`` next to ``catalog.csv`` expects.
    """
    if "://" in value or value.startswith("/") or manifest_dir is None:
        return value
    if "://" in manifest_dir:
        return posixpath.join(manifest_dir, value)
    return FileSystems.join(manifest_dir, value)


def _manifest_dir(path: str) -> str:
    if "://" in path:
        return posixpath.dirname(path)
    import os

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
    for name, type_str in columns:
        if name in (id_column, image_column, embedding_column):
            continue
        out = f"manifest_{name}" if name in RESERVED_COLUMNS else name
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
                head = handle.read(1 << 20)
            names = _csv_header(head)
            columns = [(n, "string") for n in names]
            n_rows = 1 if _csv_has_data_row(head) else 0
        else:
            columns, n_rows = _jsonl_columns(input_path)
    except CatalogError:
        raise
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


def _csv_header(head: bytes) -> list[str]:
    if not head.strip():
        return []
    table = pacsv.read_csv(
        pa.BufferReader(head.split(b"\n", 1)[0] + b"\n"),
        read_options=pacsv.ReadOptions(encoding="utf8"),
    )
    return list(table.column_names)


def _csv_has_data_row(head: bytes) -> bool:
    rest = head.split(b"\n", 1)[1] if b"\n" in head else b""
    return bool(rest.strip())


def _jsonl_columns(path: str) -> tuple[list[tuple[str, str]], int]:
    """Union of keys over the JSONL rows (in first-seen order) and the row count."""
    names: dict[str, None] = {}
    n_rows = 0
    with FileSystems.open(path) as handle:
        for line in handle:
            if not line.strip():
                continue
            n_rows += 1
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                names.update(dict.fromkeys(obj))
    return [(n, "string") for n in names], n_rows


def _cell_to_text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


class ReadManifestRowsFn(beam.DoFn):
    """Stream the rows of one manifest file as row dicts, in batches."""

    def __init__(self, info: CatalogInfo):
        self._info = info

    def process(self, path: str) -> Iterator[dict]:
        base = _manifest_dir(path)
        readers = {"csv": self._csv_rows, "jsonl": self._jsonl_rows, "parquet": self._parquet_rows}
        for row_number, raw in enumerate(readers[self._info.kind](path)):
            yield self._to_row(row_number, raw, base)

    def _to_row(self, row_number: int, raw, base: str) -> dict:
        info = self._info
        if isinstance(raw, tuple):  # (reason, message): the line itself was unusable
            return {"product_id": None, "image": None, "row_number": row_number, "extra": {},
                    "invalid": raw}
        invalid = None
        try:
            product_id = _cell_to_text(raw.get(info.id_column))
            image = _cell_to_text(raw.get(info.image_column))
        except UnicodeDecodeError as exc:
            product_id, image = None, None
            invalid = ("invalid_utf8", f"manifest row {row_number + 1}: the id or image "
                       f"column is not valid UTF-8 ({exc.reason} at byte {exc.start})")
        extra = {}
        for name, out, type_str in info.carried:
            value = raw.get(name)
            if isinstance(value, bytes):
                value = value.decode("utf-8", errors="replace")
            elif type_str == "string" and value is not None and not isinstance(value, str):
                value = _cell_to_text(value)
            extra[out] = value
        product_id = product_id.strip() if product_id is not None else None
        image = image.strip() if image is not None else None
        if invalid is None and not product_id:
            invalid = ("missing_product_id",
                       f"manifest row {row_number + 1} has no {info.id_column}")
        if invalid is None and not image and not info.embedding_column:
            invalid = ("missing_image", f"manifest row {row_number + 1} has no {info.image_column}")
        row = {
            "product_id": product_id,
            "image": resolve_image(image, base) if image else image,
            "row_number": row_number,
            "extra": extra,
        }
        if info.embedding_column:
            row["vector"] = raw.get(info.embedding_column)
        if invalid is not None:
            row["invalid"] = invalid
        return row

    def _csv_rows(self, path: str):
        # Cells are read as bytes and decoded per row, so one row with broken
        # encoding becomes one error row instead of failing the whole file; a
        # line with the wrong number of cells is likewise one error row.
        with FileSystems.open(path) as handle:
            names = _csv_header(handle.read(1 << 20))
        malformed: list = []

        def skip_malformed(row) -> str:
            malformed.append(row)
            return "skip"

        with FileSystems.open(path) as handle:
            reader = pacsv.open_csv(
                pa.PythonFile(handle, mode="r"),
                read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES, use_threads=False),
                parse_options=pacsv.ParseOptions(invalid_row_handler=skip_malformed),
                convert_options=pacsv.ConvertOptions(
                    column_types={n: pa.binary() for n in names},
                    strings_can_be_null=False, quoted_strings_can_be_null=False),
            )
            for batch in reader:
                yield from _malformed_rows(malformed, len(names))
                yield from batch.to_pylist()
            yield from _malformed_rows(malformed, len(names))

    def _jsonl_rows(self, path: str):
        with FileSystems.open(path) as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    yield ("invalid_json", f"manifest line {line_number} is not valid JSON: {exc}")
                    continue
                if not isinstance(obj, dict):
                    yield ("invalid_json", f"manifest line {line_number} is not a JSON object")
                    continue
                yield obj

    def _parquet_rows(self, path: str):
        with FileSystems.open(path) as handle:
            parquet = pq.ParquetFile(pa.PythonFile(handle, mode="r"))
            for batch in parquet.iter_batches(batch_size=10_000):
                yield from batch.to_pylist()


def _malformed_rows(malformed: list, expected: int):
    """Turn the CSV lines pyarrow skipped into (reason, message) rows, and forget them."""
    while malformed:
        row = malformed.pop(0)
        where = f"line {row.number}" if row.number is not None else "a line"
        text = row.text if len(row.text) <= 200 else row.text[:200] + "…"
        yield ("malformed_csv_row",
               f"manifest {where} has {row.actual_columns} cells where the header has "
               f"{expected} (unquoted comma?): {text!r}")


def _glob_row(metadata) -> dict:
    path = metadata.path
    stem = posixpath.splitext(posixpath.basename(path.replace("\\", "/")))[0]
    return {"product_id": stem, "image": path, "row_number": None, "extra": {}}


class ReadCatalog(beam.PTransform):
    """All catalogue rows (usable or not).

    The rows are not reshuffled here: the pipeline groups them by product id
    next (duplicate ids), and that grouping already spreads them across
    workers; a second shuffle would only add a stage.
    """

    def __init__(self, info: CatalogInfo):
        super().__init__()
        self._info = info

    def expand(self, pbegin):
        if self._info.kind == "glob":
            rows = (pbegin
                    | "MatchImages" >> fileio.MatchFiles(self._info.input)
                    | "GlobToRows" >> beam.Map(_glob_row))
        else:
            rows = (pbegin
                    | "ManifestPath" >> beam.Create([self._info.input])
                    | "ReadManifest" >> beam.ParDo(ReadManifestRowsFn(self._info)))
        return rows
