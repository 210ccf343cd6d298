"""Pure parts of the cluster (decision 0077): labels, what keeps a create on its node, disjoint uid slots."""

from __future__ import annotations

import pytest

from shoal.cluster.placement import needs_this_node, secret_ids
from shoal.engine.uids import UidSlots
from shoal.exception import InvalidError
from shoal.sdk._sandbox_args import node_labels_option
from shoal.wire.cluster import parse_labels


def test_labels_parse_and_refuse_what_is_not_key_value():
    assert parse_labels(" zone=eu , disk=ssd,") == {"zone": "eu", "disk": "ssd"}
    assert parse_labels("") == {}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_labels("zone")
    assert node_labels_option({"node_labels": "a=1"}) == {"a": "1"}
    assert node_labels_option({"node_labels": {"a": 1}}) == {"a": "1"}
    assert node_labels_option(None) is None
    with pytest.raises(InvalidError, match="node_labels"):
        node_labels_option({"node_labels": "=x"})
    with pytest.raises(InvalidError, match="enable_exit_snapshot"):
        node_labels_option({"enable_exit_snapshot": True})


def test_what_keeps_a_create_on_the_node_it_was_sent_to():
    base = {"app_id": "ap-x", "image": {"kind": "id", "image_id": "im-x", "steps": []}}
    assert not needs_this_node(base)
    assert not needs_this_node({**base, "secret_ids": ["se-1"]})  # secrets travel with the create
    assert not needs_this_node({**base, "volumes": [{"volume_id": "vo-1", "path": "/data"}]})  # a copy goes there
    for extra in (
        {"image": {"kind": "registry"}},
        {"image": {"kind": "id", "image_id": "im-x", "steps": [{"op": "run"}]}},
        {"persistent": True},
        {"gpu": "any"},
        {"enable_snapshot": True},
    ):
        assert needs_this_node({**base, **extra}), extra
    data = {"secret_ids": ["se-1", "se-2"], "outbound_headers": [{"secret_id": "se-2"}, {"secret_id": "se-3"}, {}]}
    assert secret_ids(data) == ["se-1", "se-2", "se-3"]


def test_daemons_sharing_a_host_take_disjoint_uid_slots():
    first = UidSlots(4, first=0)
    second = UidSlots(4, first=4)
    taken_first = {first.take(f"sb-a{i}") for i in range(4)}
    taken_second = {second.take(f"sb-b{i}") for i in range(4)}
    assert taken_first == {0, 1, 2, 3} and taken_second == {4, 5, 6, 7}
    assert second.ids(4).host_id == first.ids(0).host_id + 4 * 65536
    assert second.is_sandbox_id(second.ids(5).host_id) and not second.is_sandbox_id(first.ids(1).host_id)
    with pytest.raises(ValueError):
        UidSlots(4, first=-1)
