"""Where images come from (curation.data.samples): the keys a stage receives of a pool shard, image sets listed lazily."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curation.pipeline import accounting
from curation.pipeline.layout import RunLayout
from curation.data.samples import iter_image_set, shard_input_keys


REASON = {"filter": "nsfw", "dedup": "exact_duplicate"}


def _ledger(root, stage, unit, keys, dropped=()):
    accounting.write_ledger(root, stage, unit, accounting.make_ledger(
        stage, keys, [None] * len(keys), [REASON[stage] if k in dropped else None for k in keys]))


def test_shard_input_keys_are_the_input_stage_kept_keys_within_the_shard(tmp_path):
    layout = RunLayout(tmp_path, ["download", "filter", "hash", "sscd", "dedup", "embed"])
    # the filter's shards (the pool tars) judged keys 00-04 and 05-09 (08 dropped); dedup judged its kept keys at once
    _ledger(tmp_path, "filter", "00000", [f"{i:02d}" for i in range(5)])
    _ledger(tmp_path, "filter", "00001", [f"{i:02d}" for i in range(5, 10)], dropped={"08"})
    _ledger(tmp_path, "dedup", "final", [f"{i:02d}" for i in range(10) if i != 8], dropped={"03", "06"})
    assert shard_input_keys(layout, "embed", "00000") == {"00", "01", "02", "04"}
    assert shard_input_keys(layout, "embed", "00001") == {"05", "07", "09"}
    assert shard_input_keys(layout, "sscd", "00001") == {"05", "06", "07", "09"}  # sscd's input: the filter's


def test_image_sets_are_listed_without_reading_images(tmp_path):
    """Keys of a Parquet image set come from the list: its image files are read only when a sample's data is."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "one.png")
    pq.write_table(pa.table({"path": ["one.png", "later.png"]}), tmp_path / "set.parquet")
    samples = list(iter_image_set(tmp_path / "set.parquet"))
    assert [s.key for s in samples] == ["one", "later"]
    assert samples[0].data == (tmp_path / "one.png").read_bytes()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "later.png")  # after listing
    assert samples[1].data == (tmp_path / "later.png").read_bytes()
