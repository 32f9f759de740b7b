"""summary.json's typed record: what is not known yet is absent from the file (not null), except a probe layer
that is the head's input (null); it reads back to the same record, and survives pickling (torchrun)."""

from __future__ import annotations

import pickle

import pytest

from irank.formats.summary import ABSENT, RoundRecord, Summary
from irank.runtime.errors import UsageError


def test_absent_fields_are_left_out_and_a_head_input_layer_is_null():
    fresh = Summary(irank_version="1", config={"a": 1})
    assert fresh.to_dict() == {"irank_version": "1", "config": {"a": 1}}
    chosen = Summary(irank_version="1", config={}, layer=None, rounds=[RoundRecord(
        round=1, folder="round-01", scored_rows=10, removed=1, kept=9, removed_total=1, boundary="head", method="loss",
        removed_per_class={"a": 1}, seconds={"score": 0.1})])
    values = chosen.to_dict()
    assert values["layer"] is None and "val_accuracy" not in values["rounds"][0] and "layer" not in values["rounds"][0]
    again = Summary.from_dict(values, "here")
    assert again == chosen and again.to_dict() == values


def test_keys_a_later_irank_wrote_are_kept_and_a_broken_file_is_one_line():
    values = {"irank_version": "9", "config": {}, "finished": True, "a_new_key": [1, 2]}
    assert Summary.from_dict(values, "here").to_dict() == values
    with pytest.raises(UsageError, match="summary.json: not a post-train summary"):
        Summary.from_dict({"config": {}, "rounds": [{"round": 1}]}, "--out-dir x: summary.json")
    with pytest.raises(UsageError, match="not a post-train summary"):
        Summary.from_dict({"rounds": []}, "--out-dir x: summary.json")


def test_absent_is_one_object_after_pickling():
    assert pickle.loads(pickle.dumps(Summary(irank_version="1", config={}))).layer is ABSENT
