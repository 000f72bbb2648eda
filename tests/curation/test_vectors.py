"""The one descriptor-table reader: chunk by chunk, whatever the table's size."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.data.vectors import descriptor_table, load_descriptors, table_vectors


def _parts(n_parts=3, rows=300, dim=64):
    rng = np.random.default_rng(0)
    vecs = [rng.standard_normal((rows, dim), dtype=np.float32) for _ in range(n_parts)]
    tables = [descriptor_table([f"{i}-{j:03d}" for j in range(rows)], x, "pool") for i, x in enumerate(vecs)]
    return tables, vecs


def test_table_vectors_converts_chunk_by_chunk():
    """A whole pool's descriptors exceed int32 list offsets (2**31 floats, ~4.2M x 512-d), so combining a table's
    chunks into one list array fails there; the reader converts each chunk on its own.  Checked on a small table
    through Arrow's own allocations: converting never allocates as much as one chunk's vectors (combining the chunks
    would allocate all of them)."""
    tables, vecs = _parts()
    t = pa.concat_tables(tables)
    assert t.column("embedding").num_chunks == 3
    default = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(default)  # counts what is allocated while it is the default pool
    pa.set_memory_pool(pool)
    try:
        v = table_vectors(t)
    finally:
        pa.set_memory_pool(default)
    np.testing.assert_array_equal(v, np.concatenate(vecs))
    assert pool.max_memory() < vecs[0].nbytes


def test_load_descriptors_sorts_and_restricts(tmp_path):
    tables, vecs = _parts(2, rows=5, dim=4)
    paths = []
    for i, t in reversed(list(enumerate(tables))):
        paths.append(tmp_path / f"part-{i:05d}.parquet")
        pq.write_table(t, paths[-1])
    keys, x = load_descriptors(paths, keys=["1-004", "0-002", "nope"])
    assert keys == ["0-002", "1-004"]
    np.testing.assert_array_equal(x, np.stack([vecs[0][2], vecs[1][4]]))
    keys, x = load_descriptors([])
    assert keys == [] and x.shape[0] == 0
