"""Filesystem plumbing for local paths and object-store URIs: the one URI predicate, pyarrow filesystems, and atomic
writes (a reader sees either nothing or the whole file, never a part of it).
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

import pyarrow as pa
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq

OBJECT_STORES = frozenset({"s3", "gcs", "abfs"})
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")  # one letter would be a Windows drive


def is_uri(location: str) -> bool:
    """Whether `location` is a URI (`s3://b/k`, `file:///p`) rather than a local path."""
    return bool(_URI.match(str(location)))


def resolve_filesystem(location: str) -> tuple[pa_fs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local path or any URI pyarrow understands."""
    location = str(location)
    if is_uri(location):
        return pa_fs.FileSystem.from_uri(location)
    return pa_fs.LocalFileSystem(), str(Path(location).resolve())


def is_object_store(fs: pa_fs.FileSystem) -> bool:
    return fs.type_name in OBJECT_STORES


# ---------------------------------------------------------------------------------------------------- writing

def write_atomic(fs: pa_fs.FileSystem, path: str, write: Callable[[Any], None]) -> None:
    """Write `path` so that readers see either nothing or the whole file, never a part of it."""
    directory, name = posixpath.split(path)
    if is_object_store(fs):
        with fs.open_output_stream(path) as out:
            write(out)
        return
    fs.create_dir(directory, recursive=True)
    tmp = posixpath.join(directory, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with fs.open_output_stream(tmp) as out:
            write(out)
        fs.move(tmp, path)
    except BaseException:
        if fs.get_file_info(tmp).type != pa_fs.FileType.NotFound:
            fs.delete_file(tmp)
        raise


def remove_temporaries(fs: pa_fs.FileSystem, directory: str) -> int:
    """Delete what writers killed mid-way left behind (hidden `*.tmp-*` files); returns how many."""
    if is_object_store(fs) or fs.get_file_info(directory).type != pa_fs.FileType.Directory:
        return 0
    stale = [i.path for i in fs.get_file_info(pa_fs.FileSelector(directory, recursive=True))
             if i.type == pa_fs.FileType.File and posixpath.basename(i.path).startswith(".")
             and ".tmp-" in posixpath.basename(i.path)]
    for path in stale:
        fs.delete_file(path)
    return len(stale)


def write_table(fs: pa_fs.FileSystem, path: str, table: pa.Table,
                metadata: Mapping[bytes, bytes] | None = None) -> None:
    if metadata is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    write_atomic(fs, path, lambda out: pq.write_table(table, out))


def write_json(fs: pa_fs.FileSystem, path: str, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, default=str).encode()
    write_atomic(fs, path, lambda out: out.write(text))


def read_json(fs: pa_fs.FileSystem, path: str) -> Any | None:
    """The parsed file, or None when it does not exist."""
    if fs.get_file_info(path).type == pa_fs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return json.load(io.BytesIO(f.read()))
