"""Field-level diffs: dotted paths, whole-value lists, ignore lists, key order."""

from __future__ import annotations

from watcher.diff import Change, diff_records
from watcher.fingerprint import canonical, record_hash


def test_dotted_paths_and_sorted_output() -> None:
    before = {
        "name": "A",
        "custom_fields": {"tier": "gold"},
        "customer_config": {"salesforce_account_id": None},
    }
    after = {
        "name": "B",
        "custom_fields": {"tier": "platinum"},
        "customer_config": {"salesforce_account_id": "001"},
    }
    assert diff_records(before, after) == [
        Change("custom_fields.tier", "gold", "platinum"),
        Change("customer_config.salesforce_account_id", None, "001"),
        Change("name", "A", "B"),
    ]


def test_lists_compare_as_whole_values() -> None:
    assert diff_records({"ingest_aliases": ["a", "b"]}, {"ingest_aliases": ["b", "a"]}) == [
        Change("ingest_aliases", ["a", "b"], ["b", "a"])
    ]


def test_an_object_appearing_is_walked_into() -> None:
    after = {"current_billable_status": {"value": "billable", "effective_at": None}}
    assert diff_records({}, after) == [Change("current_billable_status.value", None, "billable")]


def test_missing_and_null_are_the_same() -> None:
    assert diff_records({"archived_at": None}, {}) == []


def test_ignore_list_exact_and_prefix() -> None:
    before = {"updated_at": "1", "custom_fields": {"a": "1", "b": "1"}}
    after = {"updated_at": "2", "custom_fields": {"a": "2", "b": "2"}}
    assert diff_records(before, after) == [
        Change("custom_fields.a", "1", "2"),
        Change("custom_fields.b", "1", "2"),
    ]
    assert diff_records(before, after, ignore=("updated_at", "custom_fields.a")) == [
        Change("custom_fields.b", "1", "2")
    ]
    assert diff_records(before, after, ignore=("updated_at", "custom_fields")) == []
    # A prefix is a whole path segment: ignoring custom_fields does not ignore custom_fields_x.
    assert diff_records({"custom_fields_x": 1}, {"custom_fields_x": 2}, ignore=("custom_fields",)) == [
        Change("custom_fields_x", 1, 2)
    ]


def test_key_order_never_matters() -> None:
    a = {"id": "1", "name": "X", "custom_fields": {"a": "1", "b": "2"}}
    b = {"custom_fields": {"b": "2", "a": "1"}, "name": "X", "id": "1"}
    assert canonical(a) == canonical(b)
    assert record_hash(canonical(a)) == record_hash(canonical(b))
    assert diff_records(a, b) == []


def test_unknown_extra_fields_are_diffed_as_data() -> None:
    assert diff_records({"id": "1"}, {"id": "1", "new_field": {"x": 1}}) == [Change("new_field.x", None, 1)]
