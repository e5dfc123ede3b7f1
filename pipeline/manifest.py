"""Corpus manifests: JSONL, CSV, Parquet or a local Hugging Face `datasets` dataset -> one Arrow table.

Every manifest has a path column (`path` or `uri`) and optionally `caption`, `id`, `split` and any extra columns.
The returned table always has `path` (resolved: relative paths joined to the manifest's folder, URIs kept as they are),
`source` (the path as written, a stable name that does not depend on where the corpus is mounted, with credentials in
a URI masked by `pipeline.storage.redact`: it goes into shards and error tables), `caption` (null when empty or
absent) and `id` (given, or the source). Manifests themselves may live behind any pyarrow filesystem URI, without
query parameters that would configure the filesystem client (`pipeline.storage.check_uri`); a row's URI with such
parameters fails that row when it is read (`unsafe_uri`).
"""

from __future__ import annotations

import posixpath
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.fs as pa_fs
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pipeline.storage import UnsafeUri, is_uri, redact, resolve_filesystem

PATH_COLUMNS = ("path", "uri")


class ManifestError(ValueError):
    """A manifest that cannot be read or lacks what a corpus needs; the message names the manifest."""


def _join(base: str, relative: str) -> str:
    if is_uri(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, relative))}"
    return str((Path(base) / relative).resolve())


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


def _read_table(location: str) -> tuple[pa.Table, str]:
    """The manifest's rows and the folder its relative paths resolve against."""
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
        return _read_hf_dataset(location), location
    suffix = posixpath.splitext(path)[1].lower()
    try:
        if suffix in (".jsonl", ".json", ".ndjson"):
            with fs.open_input_stream(path) as f:
                return pa_json.read_json(f), _parent(location)
        if suffix in (".csv", ".tsv"):
            options = pa_csv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
            with fs.open_input_stream(path) as f:
                return pa_csv.read_csv(f, parse_options=options), _parent(location)
        if suffix in (".parquet", ".pq"):
            return pq.read_table(path, filesystem=fs), _parent(location)
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(f"manifest {redact(location)}: cannot parse as {suffix[1:]}: {e}") from None
    raise ManifestError(f"manifest {redact(location)}: unknown format {suffix or '(no suffix)'}; "
                        "use .jsonl, .csv, .parquet or a saved Hugging Face dataset folder")


def read_manifest(location: str | Path) -> pa.Table:
    location = str(location)
    table, base = _read_table(location)
    path_column = next((c for c in PATH_COLUMNS if c in table.column_names), None)
    if path_column is None:
        raise ManifestError(f"manifest {redact(location)} has no path column (one of {PATH_COLUMNS}); "
                            f"columns: {table.column_names}")
    sources = table.column(path_column).cast(pa.string()).to_pylist()
    for row, source in enumerate(sources):
        if not source:
            raise ManifestError(f"manifest {redact(location)}: row {row} has an empty {path_column}")
    resolved = [s if is_uri(s) or Path(s).is_absolute() else _join(base, s) for s in sources]

    caption = (table.column("caption").cast(pa.string()) if "caption" in table.column_names
               else pa.nulls(len(table), pa.string()))
    caption = pc.if_else(pc.equal(pc.utf8_trim_whitespace(caption), ""), pa.scalar(None, pa.string()), caption)
    written = [redact(s) for s in sources]
    ids = pa.array(written, pa.string())
    if "id" in table.column_names:  # rows without an id fall back to their source
        ids = pc.coalesce(table.column("id").cast(pa.string()).combine_chunks(), ids)
    duplicates = pc.filter(pc.value_counts(ids).field("values"), pc.greater(pc.value_counts(ids).field("counts"), 1))
    if len(duplicates):
        raise ManifestError(f"manifest {redact(location)}: duplicate ids, for example {duplicates[0].as_py()!r} "
                            "(each input must appear once, or clips would be duplicated)")

    extras = [c for c in table.column_names if c not in (path_column, "path", "caption", "id", "source")]
    columns = {"id": ids, "path": pa.array(resolved, pa.string()), "source": pa.array(written, pa.string()),
               "caption": caption}
    columns.update({c: table.column(c) for c in extras})
    return pa.table(columns)
