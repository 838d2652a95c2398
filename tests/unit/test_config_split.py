"""How the serving config splits into a version's fields, live fields and Serve's scaling options."""

import pytest
from pydantic import ValidationError

from cluster.config import LIVE_FIELDS, SCALING_FIELDS, ServeConfig, live_fields, version_args, with_live


def test_version_and_live_fields_make_the_whole_config_again():
    config = ServeConfig(model="/m", num_workers=3, expert_replicas={"0:1": 2}, routing={"policy": "hash"},
                         limits={"max_n": 3, "frame_message_bytes": 1 << 20}, max_batch_size=8)
    version = version_args(config)
    assert not set(version) & ((LIVE_FIELDS | SCALING_FIELDS) - {"limits"})
    assert version["limits"] == {"frame_message_bytes": 1 << 20, "frame_tensor_bytes": 16 << 30}
    assert "frame_message_bytes" not in live_fields(config)["limits"]
    assert with_live(version, live_fields(config)) == config.model_copy(update={"num_replicas": 1})


def test_a_live_change_leaves_the_version_alone():
    before = ServeConfig(model="/m")
    after = ServeConfig(model="/m", routing={"policy": "balanced"}, hedge={"enabled": False}, expert_timeout_s=2)
    assert version_args(before) == version_args(after)
    assert version_args(before) != version_args(ServeConfig(model="/m", num_workers=3))


def test_a_field_that_needs_a_new_version_is_refused_as_live():
    with pytest.raises(ValueError, match="num_workers"):
        with_live({}, {"num_workers": 3})


@pytest.mark.parametrize("fields, message", [
    ({"num_replicas": 0}, "num_replicas"),
    ({"num_replicas": 2, "autoscaling": {}}, "set num_replicas or autoscaling, not both"),
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "max_replicas (2) is below min_replicas (3)"),
    ({"autoscaling": {"target_ongoing_requests": 0}}, "target_ongoing_requests"),
])
def test_bad_scaling_is_refused_naming_the_field(fields, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ServeConfig.model_validate(fields)


def test_the_vllm_engine_refuses_by_name_the_fields_it_does_not_take():
    assert ServeConfig(engine="vllm", max_batch_size=8, kv_cache_tokens=4096).engine == "vllm"
    with pytest.raises(ValidationError, match="engine vllm does not take engine_lanes, routing"):
        ServeConfig(engine="vllm", engine_lanes=2, routing={"policy": "hash"})
    with pytest.raises(ValidationError, match="routing"):  # a live change is checked the same way
        with_live(version_args(ServeConfig(engine="vllm")), {"routing": {"policy": "balanced"}})
