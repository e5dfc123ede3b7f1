"""Token shards on Ray Train workers, shared by the apps that train on them (LLM, super-resolution).

The driver reads the shards as two small materialized Ray datasets, train (every split but `val`) and val, that every
worker sees whole (`train.engine.fit` splits nothing). A worker keeps its own slice of the rows, a pure function of the
clip ids, its rank and the world size, so the slice cannot change between a run and its resume.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc

from pipeline.lineage import shards_record, tokenizer_records
from pipeline.shards import ShardSet

VAL_SPLIT = "val"


def split_datasets(shards: ShardSet, columns: list[str]) -> tuple[Any, Any]:
    """(train, val) Ray datasets of the shards' `columns`, materialized. One pyarrow read put into the object store as
    it is: for tables this small, two Ray Data read-and-filter executions cost seconds of scheduling each."""
    import ray

    table = shards.to_table(columns)
    val = pc.fill_null(pc.equal(table.column("split"), VAL_SPLIT), False)
    return ray.data.from_arrow(table.filter(pc.invert(val))), ray.data.from_arrow(table.filter(val))


def shard_columns(shard, columns: list[str], rank: int = 0, world_size: int = 1) -> dict[str, list]:
    """This rank's slice of a worker's dataset shard, ordered by clip id, as one Python list per column."""
    found: dict[str, list] = {c: [] for c in columns}
    for batch in shard.iter_batches(batch_format="pyarrow", batch_size=256):
        for c in columns:
            found[c] += batch.column(c).to_pylist()
    order = np.argsort(np.array(found["clip_id"], dtype=object).astype(str))[rank::world_size]
    return {c: [found[c][i] for i in order] for c in columns}


def log_lineage(run: Any, shards: ShardSet, location: str, train_rows: int, val_rows: int) -> None:
    """The shards a run trains on (train and val splits) and the tokenizers that wrote them, as MLflow inputs."""
    run.log_dataset(shards_record(shards, location, "train", train_rows), "train")
    run.log_dataset(shards_record(shards, location, "val", val_rows), "val")
    for role, record in tokenizer_records(shards.meta.tokenizers).items():
        run.log_dataset(record, f"{role}_tokenizer")
