"""Table sinks without a hot key: the shard count follows the row count (or is fixed), outputs are deterministic."""
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.options import beam_options
from transforms.parquet import WriteParquetShards, shard_count

SCHEMA = pa.schema([pa.field("uri", pa.string()), pa.field("value", pa.int64())])


def write(rows, prefix, **kwargs) -> list[str]:
    with beam.Pipeline(options=beam_options(["--runner=FnApiRunner"])) as pipeline:
        _ = pipeline | beam.Create(rows) | WriteParquetShards(prefix, SCHEMA, **kwargs)
    return sorted(str(p) for p in Path(prefix).parent.glob("*.parquet"))


def test_shard_count_follows_rows_unless_fixed():
    assert [shard_count(n, 0, 10) for n in (0, 1, 10, 11, 95)] == [1, 1, 1, 2, 10]
    assert shard_count(10**6, 3, 10) == 3


@pytest.mark.parametrize("rows,kwargs,files", [(25, {"rows_per_shard": 10}, 3), (25, {"shards": 2}, 2),
                                               (0, {"rows_per_shard": 10}, 1)])
def test_rows_spread_over_shards_once_each_sorted_and_deterministic(tmp_path, rows, kwargs, files):
    data = [{"uri": f"img-{i:03d}", "value": i} for i in reversed(range(rows))]
    first = write(data, str(tmp_path / "a" / "part"), **kwargs)
    second = write(list(reversed(data)), str(tmp_path / "b" / "part"), **kwargs)
    assert len(first) == files and [Path(p).name for p in first] == [Path(p).name for p in second]
    assert all(Path(p).name.endswith(f"-of-{files:05d}.parquet") for p in first)
    seen = []
    for a, b in zip(first, second):
        assert Path(a).read_bytes() == Path(b).read_bytes()
        uris = pq.read_table(a).column("uri").to_pylist()
        assert uris == sorted(uris)
        seen += uris
    assert sorted(seen) == sorted(row["uri"] for row in data)
    if rows:
        assert sum(1 for p in first if pq.read_metadata(p).num_rows) >= 2  # no single key holds the table
