"""RunLayout.input_ledger_stage: the one rule for which ledger stage's kept keys a stage receives."""

from __future__ import annotations

from curation.pipeline import accounting
from curation.pipeline.layout import RunLayout


def test_a_run_of_later_stages_takes_the_keys_an_earlier_run_judged(tmp_path):
    # a run of embed + retrieve on a root where an earlier run downloaded (no filter, no dedup ledger)
    accounting.write_ledger(tmp_path, "download", "00000",
                            accounting.make_ledger("download", ["a"], ["u"], [None]))
    later = RunLayout(tmp_path, ["embed", "retrieve"])
    assert later.input_ledger_stage("retrieve") == "download"
    assert later.input_ledger_stage("embed") == "download"
    assert RunLayout(tmp_path / "empty", ["embed", "retrieve"]).input_ledger_stage("retrieve") == "dedup"
    # a stage of the run itself is the input whatever exists on disk
    assert RunLayout(tmp_path).input_ledger_stage("retrieve") == "dedup"
    assert RunLayout(tmp_path, ["filter", "retrieve"]).input_ledger_stage("retrieve") == "filter"
    assert RunLayout(tmp_path).input_ledger_stage("download") is None
