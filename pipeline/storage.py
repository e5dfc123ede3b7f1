"""Filesystem plumbing for local paths and object-store URIs: the one URI predicate, pyarrow filesystems, URI checks
and credential redaction, atomic writes, and the lock that keeps two jobs off one output folder.

Atomic writes: a reader sees either nothing or the whole file. Every file is written under a unique hidden
temporary name (`.<name>.tmp-<random>`) beside its final one and then renamed: locally after an fsync of the file
(and of its folder after the rename); on object stores, where a failed upload may still publish a truncated object
(apache/arrow#40502), by a server-side copy of the finished temporary key, which is deleted on failure.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq

OBJECT_STORES = frozenset({"s3", "gcs", "abfs"})
# Query parameters a URI may carry. Others (endpoint_override, scheme, access_key, ...) would let a manifest row or
# a config point a filesystem client at any host, or carry credentials; those belong in the environment.
ALLOWED_QUERY = frozenset({"region"})
LEASE_S = 120.0  # an object-store lock not renewed for this long belongs to a dead job
URI_PATTERN = r"^[A-Za-z][A-Za-z0-9+.-]+://"  # one letter would be a Windows drive
_URI = re.compile(URI_PATTERN)
_TEMPORARY = re.compile(r"^\..+\.tmp-[0-9a-z_]+$")


class UnsafeUri(ValueError):
    """A URI whose query parameters are not allowed; `reason` says which, without the location."""

    def __init__(self, location: str, reason: str):
        super().__init__(f"{redact(location)}: {reason}")
        self.reason = reason


class Busy(RuntimeError):
    """An output folder that another running job holds."""


class Unreachable(ValueError):
    """An object-store location whose store does not answer (unknown host or bucket, refused credentials)."""


class NotAFolder(ValueError):
    """An output folder that cannot be one: it, or a folder above it, is a file."""


# ---------------------------------------------------------------------------------------------------- URIs

def is_uri(location: str) -> bool:
    """Whether `location` is a URI (`s3://b/k`, `file:///p`) rather than a local path."""
    return bool(_URI.match(str(location)))


def check_uri(location: str) -> str:
    """`location`, unless it is a URI with query parameters outside ALLOWED_QUERY (UnsafeUri)."""
    if not is_uri(location):
        return location
    query = urllib.parse.urlsplit(location).query
    refused = sorted({k for k, _ in urllib.parse.parse_qsl(query, keep_blank_values=True)} - ALLOWED_QUERY)
    if refused:
        raise UnsafeUri(location, f"query parameters {refused} are refused (allowed: "
                                  f"{sorted(ALLOWED_QUERY)}); set a filesystem's endpoint and credentials in the "
                                  "environment (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...), not in a URI")
    return location


def redact(location: str) -> str:
    """`location` with what may be a secret masked: a URI's user info (`s3://KEY:SECRET@bucket/...`) and the
    values of its query parameters outside ALLOWED_QUERY. Local paths are returned as they are."""
    location = str(location)
    if not is_uri(location):
        return location
    parts = urllib.parse.urlsplit(location)
    if "@" not in parts.netloc and not parts.query:
        return location
    netloc = "***@" + parts.netloc.rpartition("@")[2] if "@" in parts.netloc else parts.netloc
    query = "&".join(f"{k}={v if k in ALLOWED_QUERY else '***'}"
                     for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def redact_values(data: Any) -> Any:
    """`data` (nested dicts and lists) with every string that is a URI redacted, for records and logs."""
    if isinstance(data, str):
        return redact(data)
    if isinstance(data, Mapping):
        return {k: redact_values(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact_values(v) for v in data]
    return data


def resolve_filesystem(location: str) -> tuple[pa_fs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local path or any URI pyarrow understands (UnsafeUri for
    one whose query would configure the client)."""
    location = str(location)
    if is_uri(location):
        return pa_fs.FileSystem.from_uri(check_uri(location))
    return pa_fs.LocalFileSystem(), str(Path(location).resolve())


def is_object_store(fs: pa_fs.FileSystem) -> bool:
    return fs.type_name in OBJECT_STORES


def check_folder(location: str, what: str = "--out") -> str:
    """`location`, unless it or (locally) a folder above it is a file (NotAFolder, naming `what`) or its object store
    does not answer (Unreachable): an output folder refused before any work rather than at its first write."""
    try:
        fs, path = resolve_filesystem(location)
        # Object stores have no folders, only key prefixes: only a key at the location itself is in the way.
        entries = [Path(path), *Path(path).parents] if isinstance(fs, pa_fs.LocalFileSystem) else [path]
        kinds = [fs.get_file_info(str(entry)).type for entry in entries]
    except OSError as e:  # an unknown host or bucket, refused credentials
        if not is_uri(location):
            raise
        raise Unreachable(f"{what} {redact(location)}: cannot reach it ({e})") from None
    for entry, kind in zip(entries, kinds):
        if kind == pa_fs.FileType.File:
            where = "" if str(entry) == path else f": {entry}"
            raise NotAFolder(f"{what} {redact(location)}{where} is a file, not a folder")
        if kind == pa_fs.FileType.Directory:
            break
    return location


# ---------------------------------------------------------------------------------------------------- writing

def _temporary(path: str) -> str:
    directory, name = posixpath.split(path)
    return posixpath.join(directory, f".{name}.tmp-{uuid.uuid4().hex[:12]}")


def _fsync_dir(directory: str | Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A unique temporary path beside local `path` to write; when the block succeeds, the file is fsynced and
    renamed to `path` (then the folder is fsynced), else deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(_temporary(str(path)))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_text(path: str | Path, text: str) -> None:
    """Write a local text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def open_atomic(fs: pa_fs.FileSystem, path: str) -> Iterator[Any]:
    """An output stream for `path` that readers see either not at all or whole: published when the block succeeds,
    discarded when it raises."""
    if isinstance(fs, pa_fs.LocalFileSystem):
        with atomic_path(path) as tmp, open(tmp, "wb") as out:
            yield out
        return
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = _temporary(path)
    try:
        with fs.open_output_stream(tmp) as out:
            yield out
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the upload may never have created the key
            fs.delete_file(tmp)
        raise


def write_atomic(fs: pa_fs.FileSystem, path: str, write: Callable[[Any], Any]) -> Any:
    """Write `path` with `write(stream)` so that readers see either nothing or the whole file; returns what `write`
    returns."""
    with open_atomic(fs, path) as out:
        return write(out)


def remove_temporaries(fs: pa_fs.FileSystem, directory: str) -> int:
    """Delete what writers killed mid-way left behind (hidden `*.tmp-*` files); returns how many. Only for the
    holder of the folder's lock: another job's temporaries may be in flight."""
    if fs.get_file_info(directory).type != pa_fs.FileType.Directory:
        return 0
    stale = [i.path for i in fs.get_file_info(pa_fs.FileSelector(directory, recursive=True))
             if i.type == pa_fs.FileType.File and _TEMPORARY.match(posixpath.basename(i.path))]
    for path in stale:
        fs.delete_file(path)
    return len(stale)


def upload_folder(local: str | Path, location: str, last: Sequence[str] = ()) -> None:
    """Copy the files under the local folder to `location`, each written atomically, those named in `last` (paths
    relative to the folder) after the others: a reader that waits for them finds the rest whole."""
    local = Path(local)
    fs, root = resolve_filesystem(location)
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.relative_to(local).as_posix() in last)
    for path in files:
        with open(path, "rb") as src:
            write_atomic(fs, posixpath.join(root, path.relative_to(local).as_posix()),
                         lambda out: shutil.copyfileobj(src, out, 1 << 22))


@contextlib.contextmanager
def staged_folder(location: str, last: Sequence[str] = ()) -> Iterator[Path]:
    """A local folder to write what belongs at `location`: the folder itself, or for an object-store URI a temporary
    one uploaded when the block succeeds (`upload_folder`)."""
    if not is_uri(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="videopoet-staged-") as tmp:
        yield Path(tmp)
        upload_folder(tmp, location, last)


def write_table(fs: pa_fs.FileSystem, path: str, table: pa.Table,
                metadata: Mapping[bytes, bytes] | None = None) -> int:
    """Write `table` as Parquet, atomically; returns the file's size in bytes."""
    if metadata is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})

    def write(out) -> int:
        pq.write_table(table, out)
        return out.tell()

    return write_atomic(fs, path, write)


def write_json(fs: pa_fs.FileSystem, path: str, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, default=str).encode()
    write_atomic(fs, path, lambda out: out.write(text))


def read_json(fs: pa_fs.FileSystem, path: str) -> Any | None:
    """The parsed file, or None when it does not exist."""
    if fs.get_file_info(path).type == pa_fs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return json.load(io.BytesIO(f.read()))


# ---------------------------------------------------------------------------------------------------- locking

def owner_record(**details: Any) -> dict[str, Any]:
    """Who holds a lock: this process, and what it runs."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **details}


def _describe(owner: Mapping[str, Any] | None) -> str:
    if not owner:
        return "another job (it left no record)"
    details = ", ".join(f"{k} {v}" for k, v in owner.items() if k not in ("host", "pid", "since", "token",
                                                                          "expires"))
    return (f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('since')}"
            + (f" ({details})" if details else ""))


@contextlib.contextmanager
def exclusive(fs: pa_fs.FileSystem, path: str, owner: Mapping[str, Any], what: str) -> Iterator[None]:
    """Hold the lock file `path` for the block; Busy, naming the holder, when another job holds it.

    Local folders: `flock` on the file, released by the kernel however the holder ends (SIGKILL included).
    Object stores have no locks: a lease object that a thread renews every LEASE_S / 4 and that counts as held
    until LEASE_S after its last renewal, re-read after writing so that two jobs starting together see each other
    (best effort: a store without conditional writes cannot do better).
    """
    if isinstance(fs, pa_fs.LocalFileSystem):
        with _flock(Path(path), dict(owner), what):
            yield
    else:
        with _lease(fs, path, dict(owner), what):
            yield


@contextlib.contextmanager
def _flock(path: Path, owner: dict[str, Any], what: str) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"{what} is in use by {_describe(_parse(os.pread(fd, 1 << 16, 0)))}; wait for it to end, "
                       "or use another output folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        return json.loads(raw)
    except ValueError:
        return None


@contextlib.contextmanager
def _lease(fs: pa_fs.FileSystem, path: str, owner: dict[str, Any], what: str) -> Iterator[None]:
    token = uuid.uuid4().hex
    held = read_json(fs, path)
    if held and held.get("expires", 0) > time.time():
        raise Busy(f"{what} is in use by {_describe(held)}; wait for it to end (a lease of a job that died "
                   f"expires {LEASE_S:g} s after its last renewal), or use another output folder")
    record = {**owner, "token": token}

    def renew() -> None:
        write_json(fs, path, {**record, "expires": time.time() + LEASE_S})

    renew()
    if (read_json(fs, path) or {}).get("token") != token:
        raise Busy(f"{what} is in use by {_describe(read_json(fs, path))}, which started at the same time")
    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(LEASE_S / 4):
            with contextlib.suppress(OSError):  # a missed renewal is retried; the lease outlives several
                renew()

    thread = threading.Thread(target=keep, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(OSError):
            fs.delete_file(path)
