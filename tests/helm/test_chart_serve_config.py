"""How serveConfigV2 splits `serve`: the version's fields into the application's args (a change of them rolls out a
new version), the live ones into the deployment's user_config (applied in place), the scaling ones into Serve's
num_replicas / autoscaling_config; and the serving group, whose pods offer room for more serving replicas."""

import json

import pytest
import yaml

from cluster.config import (LIVE_FIELDS, SCALING_FIELDS, WORKER_LIMITS, AutoscalingConfig, LimitsConfig, ServeConfig,
                            live_fields, version_args)
from cluster.serving.rollout import autoscaling_options

# A value of every live and scaling field (and every `limits` key) other than its default.
CHANGES = {
    "default_replicas": 2,
    "expert_replicas": {"3:7": 2},
    "routing": {"policy": "hash", "hash_seed": 5, "capacity_factor": 1.5},
    "rebalance": {"enabled": True, "interval_s": 30.0},
    "expert_timeout_s": 5.0,
    "call_deadline": {"factor": 4.0, "floor_ms": 500.0},
    "hedge": {"enabled": False},
    "max_batch_size": 8,
    "max_waiting": 10,
    "stream_interval": 4,
    "default_max_tokens": 64,
    "api_keys_file": "/etc/moecluster/keys",
    "limits": {"max_body_bytes": 4096, "max_prompt_tokens": 100, "max_tokens": 200, "max_n": 4,
               "max_prompts": 8, "streams_per_connection": 8},
    "metrics_open": True,
    "prefill_chunk_tokens": 64,
    "kv_cache_tokens": 100000,
    "kv_cache_memory_fraction": 0.2,
    "prefix_cache_tokens": 0,
    "num_replicas": 3,
}
AUTOSCALING = {"min_replicas": 2, "max_replicas": 5}
WORKER_LIMIT_VALUES = {"frame_message_bytes": 1 << 20, "frame_tensor_bytes": 1 << 30}


def values_file(tmp_path, serve: dict, **more) -> dict:
    path = tmp_path / f"values-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump({"serve": serve, **more}))
    return {"values_files": [path]}


def raw_args(rayservice: dict) -> str:
    """The application's args exactly as serveConfigV2 has them (text), which Serve hashes into the code version."""
    text = rayservice["spec"]["serveConfigV2"]
    return text[text.index("    args:\n"):text.index("    deployments:\n")]


def test_the_changes_cover_every_live_and_scaling_field():
    assert set(CHANGES) | {"autoscaling"} == LIVE_FIELDS | SCALING_FIELDS
    assert set(CHANGES["limits"]) | WORKER_LIMITS == set(LimitsConfig.model_fields)


def test_args_hold_the_version_and_user_config_the_live_fields(render, chart, tmp_path):
    serve = {**CHANGES, "num_workers": 3, "dtype": "bfloat16",
             "limits": {**CHANGES["limits"], **WORKER_LIMIT_VALUES}}
    objects = render(**values_file(tmp_path, serve))
    args, deployment = chart.serve_args(objects), chart.serve_deployment(objects)
    # no live or scaling field in the args; of `limits`, exactly the worker limits
    assert not (set(args) - {"limits"}) & (LIVE_FIELDS | SCALING_FIELDS)
    assert args["limits"] == WORKER_LIMIT_VALUES
    assert (args["num_workers"], args["dtype"]) == (3, "bfloat16")
    # user_config: every live field set, with `limits` less the worker limits
    user_config = deployment["user_config"]
    assert set(user_config) == LIVE_FIELDS
    assert user_config["limits"] == CHANGES["limits"]
    assert user_config["routing"] == {"policy": "hash", "overflow": "reroute", "hash_seed": 5, "capacity_factor": 1.5}
    assert (user_config["max_batch_size"], user_config["api_keys_file"]) == (8, "/etc/moecluster/keys")
    # the scaling options are Serve's own, beside the user_config
    assert deployment["num_replicas"] == 3 and "autoscaling_config" not in deployment
    # the split is cluster.config's: what a replica runs is what `serve` says
    running = chart.running_config(chart.serve_config_v2(chart.only(objects, "RayService")))
    expected = ServeConfig.model_validate(serve)  # the embedded model: no model path
    assert running == expected
    assert version_args(ServeConfig.model_validate(args)) == version_args(expected)
    assert {k: v for k, v in live_fields(running).items() if k in user_config} == live_fields(expected)


def test_limits_land_in_args_and_user_config_by_key(render, chart):
    objects = render(sets=["serve.limits.max_n=4", "serve.limits.frame_message_bytes=1048576"])
    assert chart.serve_args(objects)["limits"] == {"frame_message_bytes": 1048576}
    assert chart.serve_user_config(objects)["limits"] == {"max_n": 4}
    # neither set: no limits in either; only a live one: none in the args
    assert "limits" not in chart.serve_args(render()) and "limits" not in chart.serve_user_config(render())
    assert "limits" not in chart.serve_args(render(sets=["serve.limits.max_tokens=64"]))


def test_a_live_change_leaves_the_args_byte_identical(render, chart, tmp_path):
    """What makes a change of live values an in-place update: Serve's code version (the hash of the args) stays, so
    Serve calls reconfigure on the running replicas instead of starting a new version."""
    before = chart.only(render(values_files=[chart.CI_VALUES]), "RayService")  # it sets serve.autoscaling
    changed = {key: value for key, value in CHANGES.items() if key != "num_replicas"}
    for serve in (changed, {**changed, "autoscaling": {"max_replicas": 8}},
                  {**changed, "autoscaling": None, "num_replicas": 3}):
        (extra,) = values_file(tmp_path, serve)["values_files"]
        after = chart.only(render(values_files=[chart.CI_VALUES, extra]), "RayService")
        assert raw_args(after) == raw_args(before)
        assert chart.to_json(after["spec"]["rayClusterConfig"]) == chart.to_json(before["spec"]["rayClusterConfig"])
        assert after["spec"]["serveConfigV2"] != before["spec"]["serveConfigV2"]  # the change is there, elsewhere
    # a version field, or a worker limit, changes the args: a new version
    for sets in (["serve.num_workers=9"], ["serve.limits.frame_tensor_bytes=2147483648"]):
        after = chart.only(render(values_files=[chart.CI_VALUES], sets=sets), "RayService")
        assert raw_args(after) != raw_args(before)


def test_num_replicas_and_autoscaling_land_on_the_deployment(render, chart, tmp_path):
    assert chart.serve_deployment(render())["num_replicas"] == 1
    assert chart.serve_deployment(render(sets=["serve.num_replicas=4"]))["num_replicas"] == 4
    deployment = chart.serve_deployment(render(**values_file(tmp_path, {"autoscaling": AUTOSCALING})))
    assert "num_replicas" not in deployment
    # unset keys take ServeConfig's defaults (Serve's own differ): what the CLI gives Serve for the same config
    assert deployment["autoscaling_config"] == autoscaling_options(AutoscalingConfig(**AUTOSCALING))
    assert chart.serve_deployment(render(set_jsons=["serve.autoscaling={}"]))["autoscaling_config"] == \
        autoscaling_options(AutoscalingConfig())


def test_the_fields_file_carries_serveconfig_autoscaling_defaults(chart):
    fields = json.loads((chart.CHART / "files" / "fields.json").read_text())
    assert fields["autoscaling_defaults"] == AutoscalingConfig().model_dump()


def test_num_replicas_with_autoscaling_is_refused(render, lint, run_helm, chart):
    both = {"sets": ["serve.num_replicas=2", "serve.autoscaling.max_replicas=4"]}
    for command in (render, lint):
        with pytest.raises(chart.HelmError, match=r"at '/serve/num_replicas': maximum: got 2, want 1"):
            command(**both)
    # the template refuses it too, where the schema is skipped
    with pytest.raises(chart.HelmError, match=r"serve: set num_replicas \(2\) or autoscaling, not both"):
        run_helm("template", chart.RELEASE, str(chart.CHART), "--skip-schema-validation", *sum(
            (["--set", s] for s in both["sets"]), []))
    # num_replicas left at 1 with autoscaling is fine
    render(sets=["serve.num_replicas=1", "serve.autoscaling.max_replicas=4"])


def test_the_schema_refuses_what_serveconfig_refuses(generator):
    """The generated schema's rule across num_replicas and autoscaling is ServeConfig's model validator."""
    import jsonschema

    schema = generator.serve_schema()
    for serve in ({}, {"num_replicas": 1}, {"num_replicas": 3}, {"autoscaling": None, "num_replicas": 3},
                  {"autoscaling": {}}, {"autoscaling": {"max_replicas": 4}, "num_replicas": 1},
                  {"autoscaling": {"max_replicas": 4}, "num_replicas": 2}):
        try:
            ServeConfig.model_validate(serve)
            accepted = True
        except ValueError:
            accepted = False
        assert jsonschema.Draft7Validator(schema).is_valid(serve) == accepted, serve


def test_autoscaling_below_its_minimum_is_refused(render, chart):
    with pytest.raises(chart.HelmError, match=r"serve.autoscaling: max_replicas \(2\) is below min_replicas \(3\)"):
        render(sets=["serve.autoscaling.min_replicas=3"])


@pytest.mark.parametrize("values", ["default", "ci", "autoscaling"])
def test_serve_accepts_the_rendered_config(values, render, chart, tmp_path):
    """serveConfigV2 passes Ray Serve's own schema of a deploy config (what `serve deploy` and KubeRay send)."""
    from ray.serve.schema import ServeDeploySchema

    objects = {"default": lambda: render(), "ci": lambda: render(values_files=[chart.CI_VALUES]),
               "autoscaling": lambda: render(**values_file(tmp_path, {"autoscaling": AUTOSCALING}))}[values]()
    config = ServeDeploySchema.model_validate(chart.serve_config_v2(chart.only(objects, "RayService")))
    (app,) = config.applications
    (deployment,) = app.deployments
    assert deployment.name == "MoEServer"


# --- the serving group ---

def test_the_serving_group_offers_the_serving_resource(render, chart, validate_rayservice):
    objects = render(sets=["servingGroup.enabled=true", "servingGroup.replicasPerPod=2", "autoscaling.enabled=true",
                           "servingGroup.maxReplicas=3", "serve.autoscaling.max_replicas=7"])
    service = chart.only(objects, "RayService")
    validate_rayservice(service)
    groups = chart.worker_groups(objects)
    assert list(groups) == ["experts", "serving"]  # last: enabling it adds a worker group in place
    serving = groups["serving"]
    (resource,) = chart.serve_deployment(objects)["ray_actor_options"]["resources"]
    assert serving["rayStartParams"] == {"num-cpus": "2", "resources": f'"{{\\"{resource}\\": 2}}"'}
    assert (serving["replicas"], serving["minReplicas"], serving["maxReplicas"]) == (1, 0, 3)
    # the head keeps its unit; the expert groups offer none, so no serving replica lands beside expert workers
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
    assert head["resources"] == f'"{{\\"{resource}\\": 1}}"'
    assert "resources" not in groups["experts"]["rayStartParams"]
    # Ray's autoscaler reads the group's resources from rayStartParams: it adds serving pods for pending replicas
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    pod = serving["template"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "serving"
    assert [c["name"] for c in pod["spec"]["containers"]] == ["ray-worker"]
    assert {p["name"] for p in pod["spec"]["containers"][0]["ports"]} == {"serve", "grpc", "metrics"}
    # off by default
    assert "serving" not in chart.worker_groups(render())


def test_the_serving_group_keeps_its_own_ray_start_params(render, chart, tmp_path):
    own = {"num-cpus": "6", "resources": '"{\\"moecluster-serving\\": 4, \\"fast\\": 1}"'}
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"servingGroup": {"enabled": True, "rayStartParams": own}}))
    assert chart.worker_groups(render(values_files=[values]))["serving"]["rayStartParams"] == own


def test_the_serving_group_alone_passes_the_kuberay_crd(render, chart, validate_rayservice):
    objects = render(sets=["servingGroup.enabled=true", "expertGroups.experts=null"])
    validate_rayservice(chart.only(objects, "RayService"))
    assert list(chart.worker_groups(objects)) == ["serving"]


@pytest.mark.parametrize("sets, message", [
    (["servingGroup.enabled=true", "servingGroup.replicas=3"],
     r"servingGroup: replicas \(3\) must lie between minReplicas \(0\) and maxReplicas \(2\)"),
    (["servingGroup.enabled=true", "expertGroups.serving.replicas=1", "expertGroups.serving.minReplicas=1",
      "expertGroups.serving.maxReplicas=1"], r"expertGroups.serving: the name `serving` is the serving group's"),
])
def test_a_bad_serving_group_is_refused(sets, message, render, chart):
    with pytest.raises(chart.HelmError, match=message):
        render(sets=sets)


def test_render_serve_config_needs_no_fixtures(chart):
    """The helper other suites (the integration tests' `serve deploy`) import."""
    from tests.helm.conftest import HelmError, render_serve_config

    config = render_serve_config({"serve": {"num_workers": 1, "routing": {"policy": "hash"}}},
                                 sets=["serve.num_replicas=2"])
    (app,) = config["applications"]
    assert app["args"]["num_workers"] == 1
    (deployment,) = app["deployments"]
    assert (deployment["user_config"]["routing"]["policy"], deployment["num_replicas"]) == ("hash", 2)
    with pytest.raises(HelmError, match="num_workers"):
        render_serve_config({"serve": {"num_workers": 0}})
