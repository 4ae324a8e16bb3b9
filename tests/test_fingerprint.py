"""``watcher.fingerprint``: one definition, page at a time or record by record, blind to key order."""

from __future__ import annotations

from watcher.fingerprint import canonical, canonical_all, fingerprints, record_hash


def test_a_page_and_its_records_one_by_one_have_the_same_fingerprints() -> None:
    records = [{"id": str(i), "name": f"C{i}", "custom_fields": {"b": "2", "a": str(i)}} for i in range(50)]
    assert fingerprints(canonical_all(records)) == [record_hash(canonical(r)) for r in records]
    assert len(set(fingerprints(canonical_all(records)))) == 50


def test_key_order_never_changes_a_fingerprint_and_any_value_does() -> None:
    a = {"id": "1", "custom_fields": {"a": "1", "b": "2"}}
    b = {"custom_fields": {"b": "2", "a": "1"}, "id": "1"}
    assert canonical(a) == canonical(b) == b'{"custom_fields":{"a":"1","b":"2"},"id":"1"}'
    assert record_hash(canonical(a)) == record_hash(canonical(b))
    assert record_hash(canonical({**a, "id": "2"})) != record_hash(canonical(a))


def test_a_fingerprint_fits_a_signed_64_bit_integer() -> None:
    values = fingerprints(canonical_all({"id": str(i)} for i in range(1000)))
    assert all(0 <= v < 2**63 for v in values)
