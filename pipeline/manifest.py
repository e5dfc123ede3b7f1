"""Corpus manifests: JSONL, CSV, Parquet or a local Hugging Face `datasets` dataset -> Arrow tables: the whole table
(`read_manifest`), or a stream of batches of one fixed schema that never holds the whole manifest
(`iter_manifest`, for corpora of any size).

Every manifest has a path column (`path` or `uri`) and optionally `caption`, `id`, `split` and any extra columns.
The returned table always has `path` (resolved: relative paths joined to the manifest's folder, URIs kept as they are),
`source` (the path as written, a stable name that does not depend on where the corpus is mounted, with credentials in
a URI masked by `pipeline.storage.redact`: it goes into shards and error tables), `caption` (null when empty or
absent) and `id` (given, or the source). Manifests themselves may live behind any pyarrow filesystem URI, without
query parameters that would configure the filesystem client (`pipeline.storage.check_uri`); a row's URI with such
parameters fails that row when it is read (`unsafe_uri`).

`iter_manifest` yields MANIFEST_SCHEMA: the columns above, `split` (null when absent) and `extras`, the row's other
columns as one JSON object without its null values (null when nothing is left), so that a row's extras do not depend
on the rows read with it; CSV values are read as text, an empty one as null. Only `read_manifest` checks ids for
duplicates: a stream cannot, and its reader (the tokenize job's planner) does.
"""

from __future__ import annotations

import io
import json
import posixpath
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.fs as pa_fs
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pipeline.storage import URI_PATTERN, UnsafeUri, is_uri, redact, resolve_filesystem

PATH_COLUMNS = ("path", "uri")
MANIFEST_SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("source", pa.string()),
                             ("caption", pa.string()), ("split", pa.string()), ("extras", pa.string())])
BATCH_ROWS = 65536  # rows per batch of `iter_manifest` (Parquet, Hugging Face); text formats go by BLOCK_BYTES
BLOCK_BYTES = 8 << 20
# Rows whose written path may hold a secret that `redact` masks: a URI with user info or a query.
_SECRET = URI_PATTERN + r"[^/?#]*@|^[A-Za-z][A-Za-z0-9+.-]+://[^?]*\?"


class ManifestError(ValueError):
    """A manifest that cannot be read or lacks what a corpus needs; the message names the manifest."""


def _join(base: str, relative: str) -> str:
    if is_uri(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, relative))}"
    return posixpath.normpath(posixpath.join(base, relative))  # `base` is resolved: no system call per row


def _parent(location: str) -> str:
    if is_uri(location):
        scheme, rest = location.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return str(Path(location).resolve().parent)


def _is_hf_dataset(fs: pa_fs.FileSystem, path: str) -> bool:
    info = fs.get_file_info([posixpath.join(path, "dataset_info.json"), posixpath.join(path, "dataset_dict.json"),
                             posixpath.join(path, "state.json")])
    return any(i.type == pa_fs.FileType.File for i in info)


def _read_hf_dataset(location: str) -> pa.Table:
    import datasets

    loaded = datasets.load_from_disk(location)
    if isinstance(loaded, datasets.DatasetDict):
        tables = []
        for split, ds in loaded.items():
            table = ds.with_format("arrow")[:]
            if "split" not in table.column_names:
                table = table.append_column("split", pa.array([split] * len(table), pa.string()))
            tables.append(table)
        return pa.concat_tables(tables, promote_options="default")
    return loaded.with_format("arrow")[:]


def _open(location: str) -> tuple[pa_fs.FileSystem, str, str]:
    """The filesystem, path and kind (suffix, or "hf" for a saved dataset folder) of a manifest."""
    try:
        fs, path = resolve_filesystem(location)
    except UnsafeUri as e:
        raise ManifestError(f"manifest {e}") from None
    info = fs.get_file_info(path)
    if info.type == pa_fs.FileType.NotFound:
        raise ManifestError(f"manifest {redact(location)} does not exist")
    if info.type == pa_fs.FileType.Directory:
        if not _is_hf_dataset(fs, path):
            raise ManifestError(f"manifest {redact(location)} is a folder but not a saved Hugging Face dataset")
        return fs, path, "hf"
    suffix = posixpath.splitext(path)[1].lower()
    if suffix not in (".jsonl", ".json", ".ndjson", ".csv", ".tsv", ".parquet", ".pq"):
        raise ManifestError(f"manifest {redact(location)}: unknown format {suffix or '(no suffix)'}; "
                            "use .jsonl, .csv, .parquet or a saved Hugging Face dataset folder")
    return fs, path, suffix


def _csv_options(suffix: str) -> pa_csv.ParseOptions:
    return pa_csv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")


def _read_table(location: str) -> tuple[pa.Table, str]:
    """The manifest's rows and the folder its relative paths resolve against."""
    fs, path, kind = _open(location)
    if kind == "hf":
        return _read_hf_dataset(location), location
    try:
        if kind in (".jsonl", ".json", ".ndjson"):
            with fs.open_input_stream(path) as f:
                return pa_json.read_json(f), _parent(location)
        if kind in (".csv", ".tsv"):
            with fs.open_input_stream(path) as f:
                return pa_csv.read_csv(f, parse_options=_csv_options(kind)), _parent(location)
        return pq.read_table(path, filesystem=fs), _parent(location)
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(f"manifest {redact(location)}: cannot parse as {kind[1:]}: {e}") from None


def _batches(location: str) -> tuple[Iterator[pa.Table], str]:
    """The manifest's rows in batches, read as a stream, and the folder its relative paths resolve against."""
    fs, path, kind = _open(location)
    if kind == "hf":
        return _hf_batches(location), location

    def stream() -> Iterator[pa.Table]:
        try:
            if kind in (".jsonl", ".json", ".ndjson"):
                with fs.open_input_stream(path) as f:
                    yield from _jsonl_batches(f)
            elif kind in (".csv", ".tsv"):
                yield from _csv_batches(fs, path, kind)
            else:
                # pre_buffer (pyarrow's default) keeps every row group read cached until the file closes: the whole
                # manifest in memory by the end (534 MB of a 10M-row, 504 MB file).
                with fs.open_input_file(path) as f:
                    for batch in pq.ParquetFile(f, pre_buffer=False).iter_batches(batch_size=BATCH_ROWS):
                        yield pa.Table.from_batches([batch])
        except (pa.ArrowInvalid, OSError) as e:
            raise ManifestError(f"manifest {redact(location)}: cannot parse as {kind[1:]}: {e}") from None

    return stream(), _parent(location)


def _jsonl_batches(f) -> Iterator[pa.Table]:
    """Blocks of whole lines, each parsed on its own (a stream reader would fix the types of the first block)."""
    rest = b""
    while True:
        block = f.read(BLOCK_BYTES)
        data = rest + block
        cut = len(data) if not block else data.rfind(b"\n") + 1
        lines, rest = data[:cut], data[cut:]
        if lines.strip():
            yield pa_json.read_json(io.BytesIO(lines))
        if not block:
            return


def _csv_batches(fs: pa_fs.FileSystem, path: str, suffix: str) -> Iterator[pa.Table]:
    """Blocks of a CSV file, every column read as text (a stream reader would otherwise fix each column's type from
    its first block), an empty field as null (CSV cannot tell it from a missing one)."""
    with fs.open_input_stream(path) as f:
        names = pa_csv.open_csv(f, parse_options=_csv_options(suffix)).schema.names
    convert = pa_csv.ConvertOptions(column_types={name: pa.string() for name in names}, strings_can_be_null=True)
    with fs.open_input_stream(path) as f:
        reader = pa_csv.open_csv(f, parse_options=_csv_options(suffix), convert_options=convert,
                                 read_options=pa_csv.ReadOptions(block_size=BLOCK_BYTES))
        for batch in reader:
            yield pa.Table.from_batches([batch])


def _hf_batches(location: str) -> Iterator[pa.Table]:
    import datasets

    loaded = datasets.load_from_disk(location)
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for split, ds in splits:
        for batch in ds.data.to_batches(max_chunksize=BATCH_ROWS):
            table = pa.Table.from_batches([batch])
            if split is not None and "split" not in table.column_names:
                table = table.append_column("split", pa.array([split] * len(table), pa.string()))
            yield table


def _core(table: pa.Table, location: str, base: str, offset: int) -> tuple[dict[str, pa.Array], str]:
    """The columns every manifest row gets (id, path, source, caption), and the name of the path column; `offset`
    is the row number of the table's first row in the manifest, for messages."""
    path_column = next((c for c in PATH_COLUMNS if c in table.column_names), None)
    if path_column is None:
        raise ManifestError(f"manifest {redact(location)} has no path column (one of {PATH_COLUMNS}); "
                            f"columns: {table.column_names}")

    def text(column: str) -> pa.Array:
        try:
            return _flat(table.column(column).cast(pa.string()))
        except pa.ArrowInvalid as e:  # a CSV column that is not UTF-8 reads as binary, which no cast turns to text
            raise ManifestError(f"manifest {redact(location)}: column {column!r} is not UTF-8 text ({e})") from None

    sources = text(path_column)
    empty = pc.fill_null(pc.equal(sources, ""), True)
    if pc.any(empty).as_py():
        row = offset + int(np.flatnonzero(empty.to_numpy(zero_copy_only=False))[0])
        raise ManifestError(f"manifest {redact(location)}: row {row} has an empty {path_column}")
    # Vectorized: only the rows that need it go through Python (relative paths, URIs that may hold a secret).
    relative = pc.invert(pc.or_(pc.match_substring_regex(sources, URI_PATTERN), pc.starts_with(sources, "/")))
    resolved = _replace(sources, relative, lambda s: _join(base, s))
    written = _replace(sources, pc.match_substring_regex(sources, _SECRET), redact)
    caption = text("caption") if "caption" in table.column_names else pa.nulls(len(table), pa.string())
    caption = pc.if_else(pc.equal(pc.utf8_trim_whitespace(caption), ""), pa.scalar(None, pa.string()), caption)
    ids = written
    if "id" in table.column_names:  # rows without an id fall back to their source
        ids = pc.coalesce(text("id"), written)
    columns = {"id": ids, "path": resolved, "source": written, "caption": _flat(caption)}
    return columns, path_column


def _flat(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _replace(values: pa.Array, mask: pa.Array, fn) -> pa.Array:
    """`values` with `fn(value)` where `mask` is true."""
    rows = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
    if not len(rows):
        return values
    replacements = pa.array([fn(values[int(i)].as_py()) for i in rows], pa.string())
    return pc.replace_with_mask(values, mask, replacements)


def _others(table: pa.Table, path_column: str) -> list[str]:
    return [c for c in table.column_names if c not in (path_column, "path", "caption", "id", "source")]


def read_manifest(location: str | Path) -> pa.Table:
    """The whole manifest: id, path, source, caption and its other columns as they are; duplicate ids refused."""
    location = str(location)
    table, base = _read_table(location)
    columns, path_column = _core(table, location, base, 0)
    ids = columns["id"]
    duplicates = pc.filter(pc.value_counts(ids).field("values"), pc.greater(pc.value_counts(ids).field("counts"), 1))
    if len(duplicates):
        raise ManifestError(f"manifest {redact(location)}: duplicate ids, for example {duplicates[0].as_py()!r} "
                            "(each input must appear once, or clips would be duplicated)")
    columns.update({c: table.column(c) for c in _others(table, path_column)})
    return pa.table(columns)


def iter_manifest(location: str | Path) -> Iterator[pa.Table]:
    """The manifest as a stream of MANIFEST_SCHEMA tables, in manifest order; memory holds one batch."""
    location = str(location)
    batches, base = _batches(location)
    offset = 0
    for table in batches:
        if not len(table):
            continue
        columns, path_column = _core(table, location, base, offset)
        split = (table.column("split").cast(pa.string()) if "split" in table.column_names
                 else pa.nulls(len(table), pa.string()))
        others = [c for c in _others(table, path_column) if c != "split"]
        yield pa.table({**columns, "split": split, "extras": _extras(table.select(others))}, schema=MANIFEST_SCHEMA)
        offset += len(table)


def _extras(table: pa.Table) -> pa.Array:
    if not table.num_columns:
        return pa.nulls(len(table), pa.string())
    texts = []
    for row in table.to_pylist():
        kept = {k: v for k, v in row.items() if v is not None}
        texts.append(json.dumps(kept, sort_keys=True, default=str) if kept else None)
    return pa.array(texts, pa.string())
