"""The accounting invariants on real ledger files: every key judged once, each stage judging exactly the keys the
previous ledger stage kept (checked with Arrow joins)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from curation.pipeline import accounting


def _ledger(root, stage, unit, keys, reasons):
    accounting.write_ledger(root, stage, unit, accounting.make_ledger(stage, keys, [f"u{k}" for k in keys], reasons))


def test_invariants_name_missing_and_unexpected_keys(tmp_path):
    keys = [f"{i:010d}" for i in range(10)]
    _ledger(tmp_path, "download", "00000", keys[:6], [None] * 5 + ["timeout"])
    _ledger(tmp_path, "download", "00001", keys[6:], [None, None, "http_error", None])
    # filter judged keys 0-4 and 6 but not 7 or 9 (kept by download), and judged 8 (dropped by download)
    _ledger(tmp_path, "filter", "00000", keys[:5], [None] * 5)
    _ledger(tmp_path, "filter", "00001", [keys[6], keys[8]], [None, None])
    with pytest.raises(accounting.AccountingError) as err:
        accounting.check_invariants(tmp_path)
    assert str(err.value) == ("stage 'filter': input differs from the previous stage's kept keys (2 never judged, "
                              "e.g. ['0000000007', '0000000009']; 1 unexpected, e.g. ['0000000008'])")


def test_invariants_hold_and_catch_a_key_judged_twice(tmp_path):
    keys = [f"{i:010d}" for i in range(6)]
    _ledger(tmp_path, "download", "00000", keys, [None, None, None, "timeout", None, None])
    _ledger(tmp_path, "filter", "00000", [k for i, k in enumerate(keys) if i != 3], [None, "too_small", None, None, None])
    accounting.check_invariants(tmp_path)
    _ledger(tmp_path, "filter", "00001", [keys[0]], [None])
    with pytest.raises(accounting.AccountingError, match="stage 'filter': some keys have more than one ledger row"):
        accounting.check_invariants(tmp_path)


def test_a_global_ledger_is_written_partitioned_like_its_input(tmp_path):
    keys = [f"{i:010d}" for i in range(8)]
    _ledger(tmp_path, "filter", "00000", keys[:4], [None, "too_small", None, None])
    _ledger(tmp_path, "filter", "00001", keys[4:], [None, None, "bad_aspect", None])
    kept = [k for k in keys if k not in (keys[1], keys[6])]
    verdicts = accounting.make_ledger("dedup", kept[::-1], [f"u{k}" for k in kept[::-1]],
                                      [None, "copy_duplicate", None, None, "exact_duplicate", None])
    accounting.write_ledger_by_shard(tmp_path, "dedup", verdicts, "filter")
    parts = sorted((tmp_path / "dedup" / "_ledger").iterdir())
    assert [p.name for p in parts] == ["00000.parquet", "00001.parquet"]
    assert pq.read_table(parts[0])["key"].to_pylist() == [keys[0], keys[2], keys[3]]
    assert pq.read_table(parts[1])["key"].to_pylist() == [keys[4], keys[5], keys[7]]
    accounting.check_invariants(tmp_path)
    stray = accounting.make_ledger("dedup", [keys[1]], ["u"], [None])  # filter dropped it: no part holds it
    with pytest.raises(accounting.AccountingError, match="1 of its 1 verdicts are on keys no 'filter' ledger part kept"):
        accounting.write_ledger_by_shard(tmp_path, "dedup", stray, "filter")
