"""Planning a tokenize job at any corpus size: driver memory bounded by a budget, not by the corpus.

Exactly once rests on a fixed assignment of inputs to shards: a generation's inputs (below) sorted by id, its shard
`first_shard + k` holding its inputs [k * n, (k + 1) * n). That takes a sort of every id, done here as an external
sort on the driver's local disk:

1. the manifest streams in (`pipeline.manifest.iter_manifest`); batches gather up to `budget` bytes, are sorted by
   id and spilled as a run (Arrow IPC, zstd) to a local temporary folder;
2. the runs are merged (`merge_sorted`: k-way, one batch of each run in memory at a time), which finds duplicate ids;
3. the merged manifest is paired (`pair_sorted`) with the ids that earlier runs planned, stored per generation under
   `OUT/__jobs/<fingerprint>/ids/gen-NNNNN/part-NNNNN.parquet` (id-sorted, with their shards): a row found there
   keeps its shard, a new row joins the new generation, and an earlier id that the manifest lacks is refused;
4. the rows of shards not done yet are written as work parts to the local folder, and `WorkSource` reads them into
   the job's Ray Data pipeline (read tasks on the driver's node, which holds the folder; no CPU asked, since a head
   node may have none).

Generations: the first run of a tokenization plans generation 0, the whole manifest. A later run whose manifest holds
every input planned before plus new ones plans the new ones as the next generation, sorted among themselves into
shards after the existing ones: no existing shard moves. The generations are recorded in `job.json` only once their
ids are written, so a run killed while planning leaves nothing that counts.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import os
import posixpath
import shutil
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.manifest import MANIFEST_SCHEMA, ManifestError, iter_manifest
from pipeline.storage import redact, write_table

RUN_BATCH_ROWS = 8192  # rows per batch of a spilled run: the merge holds one batch per run
WORK_PART_ROWS = 65536  # rows per work part: one Ray read task each, its output split into one block per row
IDS_PART_ROWS = 1 << 20  # rows per ids part in OUT (about 30-60 MB of ids)
IDS_SCHEMA = pa.schema([pa.field("id", pa.string(), False), pa.field("shard", pa.int64(), False)])
WORK_SCHEMA = MANIFEST_SCHEMA.append(pa.field("shard", pa.int64()))
_IPC = pa.ipc.IpcWriteOptions(compression="zstd")


class PlanError(ValueError):
    """A manifest that cannot be planned into this OUT (removed inputs, duplicates, no rows); names the manifest."""


@dataclass(frozen=True)
class Generation:
    """Inputs planned by one run: sorted among themselves into shards [first_shard, first_shard + shards)."""

    index: int
    inputs: int
    first_shard: int
    shards: int
    parts: int  # ids parts under ids/gen-NNNNN/
    ids_sha256: str  # of the generation's ids, sorted, joined by newlines
    manifest: str
    created: str  # ISO 8601, UTC: also the `created` of the generation's shards, so a redone shard is the same file

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Generation":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


@dataclass
class Plan:
    generations: list[Generation]  # the new one included, if the manifest had new inputs
    work: list[tuple[str, int]]  # (local work part, rows), generation by generation
    pending_shards: int  # shards with rows in the work
    inputs: int  # rows in the manifest
    new_inputs: int


def shard_inputs(generations: list[Generation], inputs_per_shard: int, shard: int) -> int:
    """How many inputs shard `shard` holds: `inputs_per_shard`, but fewer in a generation's last shard."""
    firsts = [g.first_shard for g in generations]
    g = generations[bisect.bisect_right(firsts, shard) - 1]
    return min(inputs_per_shard, g.inputs - (shard - g.first_shard) * inputs_per_shard)


# ---------------------------------------------------------------------------------------------------- sorted streams

def read_ipc(path: str) -> Iterator[pa.Table]:
    """An Arrow IPC file batch by batch. Not memory-mapped: pages read stay out of the process's resident memory."""
    with pa.OSFile(path) as f:
        reader = pa.ipc.open_file(f)
        for i in range(reader.num_record_batches):
            yield pa.Table.from_batches([reader.get_batch(i)])


def write_ipc(path: str, table: pa.Table, batch_rows: int) -> None:
    with pa.OSFile(path, "wb") as f, pa.ipc.new_file(f, table.schema, options=_IPC) as writer:
        writer.write_table(table, max_chunksize=batch_rows)


def spill_runs(batches: Iterable[pa.Table], folder: str, budget: int) -> list[str]:
    """Sorted runs of at most `budget` bytes of input each (about twice that in memory while one is sorted)."""
    runs: list[str] = []
    pending: list[pa.Table] = []
    size = 0

    def spill() -> None:
        path = os.path.join(folder, f"run-{len(runs):06d}.arrow")
        write_ipc(path, pa.concat_tables(pending).sort_by("id"), RUN_BATCH_ROWS)
        runs.append(path)

    for batch in batches:
        pending.append(batch)
        size += batch.nbytes
        if size >= budget:
            spill()
            pending, size = [], 0
    if pending:
        spill()
    return runs


def _last(table: pa.Table, key: str) -> str:
    return table.column(key)[-1].as_py()


def _split(table: pa.Table, key: str, bound: str) -> tuple[pa.Table, pa.Table]:
    """The rows of a key-sorted table up to `bound` (included), and the rest."""
    n = pc.sum(pc.less_equal(table.column(key), bound)).as_py() or 0
    return table.slice(0, n), table.slice(n)


class _Buffered:
    """A sorted stream with a non-empty head batch, or exhausted (`head` None)."""

    def __init__(self, stream: Iterable[pa.Table]):
        self.stream = iter(stream)
        self.head: Optional[pa.Table] = None
        self.refill()

    def refill(self) -> bool:
        while self.head is None or not len(self.head):
            self.head = next(self.stream, None)
            if self.head is None:
                return False
        return True


def merge_sorted(streams: list[Iterable[pa.Table]], key: str = "id") -> Iterator[pa.Table]:
    """Merge streams of key-sorted tables into one key-sorted stream, a batch at a time: each step emits every
    buffered row up to the smallest of the buffers' last keys, which no row still unread can precede."""
    live = [s for s in map(_Buffered, streams) if s.head is not None]
    while live:
        bound = min(_last(s.head, key) for s in live)
        parts = []
        for s in live:
            part, s.head = _split(s.head, key, bound)
            parts.append(part)
        merged = pa.concat_tables(parts)
        yield merged.sort_by(key) if len(live) > 1 else merged
        live = [s for s in live if s.refill()]


def pair_sorted(left: Iterable[pa.Table], right: Iterable[pa.Table], left_schema: pa.Schema,
                right_schema: pa.Schema, key: str = "id") -> Iterator[tuple[pa.Table, pa.Table]]:
    """Two key-sorted streams as pairs of tables over the same key range: a key present in both streams comes in
    the same pair."""
    a, b = _Buffered(left), _Buffered(right)
    while a.head is not None or b.head is not None:
        if a.head is None or b.head is None:
            yield (a.head if a.head is not None else left_schema.empty_table(),
                   b.head if b.head is not None else right_schema.empty_table())
            a.head = b.head = None
            a.refill(), b.refill()
            continue
        bound = min(_last(a.head, key), _last(b.head, key))
        (part_a, a.head), (part_b, b.head) = _split(a.head, key, bound), _split(b.head, key, bound)
        yield part_a, part_b
        a.refill(), b.refill()


def _unique(stream: Iterable[pa.Table], manifest: str) -> Iterator[pa.Table]:
    """The sorted stream, refused at its first duplicate id."""
    previous: Optional[str] = None
    for table in stream:
        ids = table.column("id").combine_chunks()
        same = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))
        duplicate = ids[0].as_py() if ids[0].as_py() == previous else None
        if duplicate is None and pc.any(same).as_py():
            duplicate = ids[int(np.flatnonzero(same.to_numpy(zero_copy_only=False))[0])].as_py()
        if duplicate is not None:
            raise PlanError(f"manifest {redact(manifest)}: duplicate ids, for example {duplicate!r} (each input must "
                            "appear once, or clips would be duplicated)")
        previous = ids[-1].as_py()
        yield table


def _joined(ids: pa.Array) -> pa.Buffer:
    """The ids joined by newlines, without a Python object per id."""
    joined = pc.binary_join(pa.ListArray.from_arrays(pa.array([0, len(ids)], pa.int32()), ids), "\n")
    return joined[0].as_buffer()


# ---------------------------------------------------------------------------------------------------- planner

class _Parts:
    """Rows gathered into parts of `rows` rows, each written by `write(index, table)` when full and at the end;
    `written` holds what each call returned."""

    def __init__(self, rows: int, write):
        self.rows, self.write = rows, write
        self.pending: list[pa.Table] = []
        self.count = 0
        self.written: list[Any] = []

    def add(self, table: pa.Table) -> None:
        if not len(table):
            return
        self.pending.append(table)
        self.count += len(table)
        while self.count >= self.rows:
            whole = pa.concat_tables(self.pending)
            self._write(whole.slice(0, self.rows))
            rest = whole.slice(self.rows)
            self.pending, self.count = ([rest] if len(rest) else []), len(rest)

    def close(self) -> None:
        if self.count:
            self._write(pa.concat_tables(self.pending))
        self.pending, self.count = [], 0

    def _write(self, table: pa.Table) -> None:
        self.written.append(self.write(len(self.written), table.combine_chunks()))


class Planner:
    """Plans a manifest into the generations of one tokenization (`job_dir` = OUT/__jobs/<fingerprint> inside `fs`),
    using `folder` (local, removed by the caller) for runs and work parts."""

    def __init__(self, fs: pa_fs.FileSystem, job_dir: str, inputs_per_shard: int, budget: int, folder: str):
        self.fs, self.job_dir = fs, job_dir
        self.n = inputs_per_shard
        self.budget = budget
        self.folder = folder

    def ids_dir(self, generation: int) -> str:
        return posixpath.join(self.job_dir, "ids", f"gen-{generation:05d}")

    def ids_part(self, generation: int, part: int) -> str:
        return posixpath.join(self.ids_dir(generation), f"part-{part:05d}.parquet")

    def _ids(self, g: Generation) -> Iterator[pa.Table]:
        for part in range(g.parts):
            with self.fs.open_input_file(self.ids_part(g.index, part)) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=RUN_BATCH_ROWS):
                    yield pa.Table.from_batches([batch]).cast(IDS_SCHEMA)

    def plan(self, manifest: str, generations: list[Generation], done: np.ndarray, created: str) -> Plan:
        """Plan `manifest` against the recorded `generations`; `done` holds the indices of the shards already
        written, whose rows need no work. Raises PlanError (or ManifestError) for a manifest that does not fit."""
        new = len(generations)
        with contextlib.suppress(FileNotFoundError):  # ids of a generation a killed run never recorded
            self.fs.delete_dir(self.ids_dir(new))
        try:
            return self._plan(manifest, generations, done, created)
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.delete_dir(self.ids_dir(new))
            raise

    def _plan(self, manifest: str, generations: list[Generation], done: np.ndarray, created: str) -> Plan:
        runs_dir = os.path.join(self.folder, "runs")
        os.makedirs(runs_dir, exist_ok=True)
        try:
            runs = spill_runs(iter_manifest(manifest), runs_dir, self.budget)
        except ManifestError as e:
            raise PlanError(str(e)) from None
        if not runs:
            raise PlanError(f"manifest {redact(manifest)} has no rows")
        index = len(generations)
        first = sum(g.shards for g in generations)
        firsts = np.array([g.first_shard for g in generations] + [first], np.int64)
        work = [self._work_writer(g) for g in range(index + 1)]
        ids = _Parts(IDS_PART_ROWS, lambda part, table: write_table(self.fs, self.ids_part(index, part), table))
        digest = hashlib.sha256()
        inputs = new_inputs = missing = pending_shards = 0
        last = np.full(index + 1, -1, np.int64)  # per generation, the last shard counted (shards come in order)
        example: Optional[str] = None
        merged = _unique(merge_sorted([read_ipc(r) for r in runs]), manifest)
        old = merge_sorted([self._ids(g) for g in generations])
        for rows, known in pair_sorted(merged, old, MANIFEST_SCHEMA, IDS_SCHEMA):
            inputs += len(rows)
            gone = known.filter(pc.invert(pc.is_in(known.column("id"), value_set=rows.column("id"))))
            if len(gone):
                missing += len(gone)
                example = example or gone.column("id")[0].as_py()
            position = pc.index_in(rows.column("id"), value_set=known.column("id"))
            is_new = pc.is_null(position).to_numpy(zero_copy_only=False)
            shard = np.empty(len(rows), np.int64)
            shard[~is_new] = known.column("shard").take(position.drop_null()).to_numpy()
            count = int(is_new.sum())
            shard[is_new] = first + (new_inputs + np.arange(count)) // self.n
            if count:
                fresh = rows.filter(pa.array(is_new))
                digest.update(b"\n" if new_inputs else b"")
                digest.update(_joined(fresh.column("id").combine_chunks()))
                ids.add(pa.table({"id": fresh.column("id"), "shard": shard[is_new]}, schema=IDS_SCHEMA))
            new_inputs += count
            pending = ~np.isin(shard, done)
            generation = np.searchsorted(firsts, shard, side="right") - 1
            for g in np.unique(generation[pending]):
                keep = pending & (generation == g)
                work[g].add(rows.filter(pa.array(keep)).append_column("shard", pa.array(shard[keep])))
                shards = np.unique(shard[keep])
                pending_shards += int((shards > last[g]).sum())
                last[g] = shards[-1]
        if missing:
            raise PlanError(
                f"manifest {redact(manifest)} lacks {missing} of the {sum(g.inputs for g in generations)} inputs "
                f"that earlier runs planned into this tokenization, e.g. {example!r}: inputs cannot be removed from "
                "a tokenization (its shards hold them); keep every earlier row in the manifest and add new ones, or "
                "use another --out")
        ids.close()
        for writer in work:
            writer.close()
        if new_inputs:
            generations = [*generations, Generation(index, new_inputs, first, -(-new_inputs // self.n),
                                                    len(ids.written), digest.hexdigest(), redact(manifest), created)]
        shutil.rmtree(runs_dir)
        return Plan(generations, [part for writer in work for part in writer.written], pending_shards, inputs,
                    new_inputs)

    def _work_writer(self, generation: int) -> _Parts:
        folder = os.path.join(self.folder, f"work-{generation:05d}")
        os.makedirs(folder, exist_ok=True)

        def write(part: int, table: pa.Table) -> tuple[str, int]:
            path = os.path.join(folder, f"part-{part:06d}.arrow")
            write_ipc(path, table.cast(WORK_SCHEMA), WORK_PART_ROWS)
            return path, len(table)

        return _Parts(WORK_PART_ROWS, write)


# ---------------------------------------------------------------------------------------------------- Ray source

class WorkSource(Datasource):
    """The work parts as a Ray Data source: one read task per part, run on the driver's node (the parts are on its
    local disk), one block per part."""

    def __init__(self, parts: list[tuple[str, int]]):
        self.parts = list(parts)

    @property
    def supports_distributed_reads(self) -> bool:
        return False

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(lambda path=path: read_ipc(path),
                         BlockMetadata(num_rows=rows, size_bytes=None, exec_stats=None, input_files=(path,)),
                         per_task_row_limit=per_task_row_limit)
                for path, rows in self.parts]
