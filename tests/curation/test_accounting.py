"""accounting: the invariant checks name what differs, in the same words whatever the size of the ledgers."""

from __future__ import annotations

import pytest

from curation import accounting


def _ledger(root, stage, unit, kept, dropped=()):
    reason = {"download": "http_error", "filter": "too_small"}[stage]
    keys = list(kept) + list(dropped)
    accounting.write_ledger(root, stage, unit, accounting.make_ledger(
        stage, keys, [f"u{k}" for k in keys], [None] * len(kept) + [reason] * len(dropped)))


def test_a_stage_judging_other_keys_than_the_previous_kept_is_named_with_examples(tmp_path):
    _ledger(tmp_path, "download", "00000", ["k05", "k01", "k09"], dropped=["k02"])
    _ledger(tmp_path, "download", "00001", ["k07", "k03", "k04"])  # two parts: keys in several chunks
    _ledger(tmp_path, "filter", "00000", ["k09", "k02"])
    _ledger(tmp_path, "filter", "00001", ["k08", "k06"], dropped=["k07"])
    with pytest.raises(accounting.AccountingError) as err:
        accounting.check_invariants(tmp_path)
    assert str(err.value) == ("stage 'filter': input differs from the previous stage's kept keys (4 never judged, "
                              "e.g. ['k01', 'k03', 'k04']; 3 unexpected, e.g. ['k02', 'k06', 'k08'])")


def test_matching_stages_pass_and_a_key_judged_twice_is_named(tmp_path):
    _ledger(tmp_path, "download", "00000", ["a", "b"], dropped=["c"])
    _ledger(tmp_path, "filter", "00000", ["b"], dropped=["a"])
    accounting.check_invariants(tmp_path)
    _ledger(tmp_path, "filter", "00001", ["a"])
    with pytest.raises(accounting.AccountingError, match="^stage 'filter': some keys have more than one ledger row$"):
        accounting.check_invariants(tmp_path)
