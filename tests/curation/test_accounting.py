"""The accounting invariants on real ledger files: every key judged once, each stage judging exactly the keys the
previous ledger stage kept (checked with Arrow joins)."""

from __future__ import annotations

import pytest

from curation import accounting


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
