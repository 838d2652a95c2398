"""The chart lints, renders with the default and the ci values, and what it renders passes the Kubernetes schemas
and KubeRay's CRD; serveConfigV2 carries the serving config exactly as the CLI reads it."""

import copy

import pytest
import yaml

from cluster.cli import load_config
from cluster.config import LIVE_FIELDS, ServeConfig
from cluster.node_env import ACTOR_ENV, NODE_ENV
from cluster.serving.grpc_api import SERVICERS

VALUE_SETS = ["default", "ci"]

# Every model storage source, with the objects it renders: each must pass the schemas too.
STORAGE = {
    "embedded": {},
    "demo": {"sets": ["modelStorage.type=demo"]},
    "pvc-existing": {"sets": ["modelStorage.type=pvc", "modelStorage.pvc.existingClaim=models",
                              "modelStorage.pvc.subPath=qwen3"]},
    "pvc-create": {"sets": ["modelStorage.type=pvc", "modelStorage.pvc.create=true",
                            "modelStorage.pvc.storageClassName=nfs"]},
    "hostPath": {"sets": ["modelStorage.type=hostPath", "modelStorage.hostPath.path=/data/qwen3"]},
    "download": {"sets": ["modelStorage.type=download", "modelStorage.download.repoId=Qwen/Qwen3-30B-A3B",
                          "modelStorage.download.env[0].name=HF_TOKEN",
                          "modelStorage.download.env[0].valueFrom.secretKeyRef.name=hf",
                          "modelStorage.download.env[0].valueFrom.secretKeyRef.key=token"]},
}


@pytest.fixture(scope="module", params=VALUE_SETS)
def value_set(request, chart):
    return request.param, ({"values_files": [chart.CI_VALUES]} if request.param == "ci" else {})


@pytest.fixture(scope="module")
def objects(value_set, default_objects, ci_objects):
    return ci_objects if value_set[0] == "ci" else default_objects


def test_lint_strict(lint, value_set):
    out = lint(**value_set[1])
    assert "1 chart(s) linted, 0 chart(s) failed" in out
    assert "[WARNING]" not in out and "[ERROR]" not in out


def test_renders_the_expected_objects(objects, value_set, chart):
    kinds = sorted(o["kind"] for o in objects)
    if value_set[0] == "default":
        assert kinds == ["NetworkPolicy", "RayService", "Service", "Service"]
    else:  # a created PVC, the two metrics Services and the ServiceMonitor on top
        assert kinds == ["NetworkPolicy", "PersistentVolumeClaim", "RayService", "Service", "Service", "Service",
                         "Service", "ServiceMonitor"]
    for obj in objects:
        assert obj["metadata"]["name"].startswith(f"{chart.RELEASE}-moecluster")
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == chart.RELEASE


def test_builtin_kinds_pass_the_kubernetes_schemas(objects, validate_kubernetes):
    builtin = [o for o in objects if o["kind"] not in ("RayService", "ServiceMonitor")]
    assert builtin
    for obj in builtin:
        validate_kubernetes(obj)


def test_rayservice_passes_the_kuberay_crd(objects, validate_rayservice, chart):
    validate_rayservice(chart.only(objects, "RayService"))


@pytest.mark.parametrize("storage", STORAGE)
def test_every_model_storage_passes_the_kubernetes_schemas(storage, render, validate_kubernetes):
    objects = render(**STORAGE[storage])
    for obj in objects:
        if obj["kind"] != "RayService":
            validate_kubernetes(obj)
    assert ("PersistentVolumeClaim" in [o["kind"] for o in objects]) == (storage == "pvc-create")


@pytest.mark.parametrize("storage", STORAGE)
def test_every_model_storage_passes_the_kuberay_crd(storage, render, validate_rayservice, chart):
    validate_rayservice(chart.only(render(**STORAGE[storage]), "RayService"))


def test_the_kuberay_check_catches_a_bad_rayservice(default_objects, validate_rayservice, chart):
    bad = copy.deepcopy(chart.only(default_objects, "RayService"))
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 1
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicaz"] = 3
    with pytest.raises(AssertionError, match=r"(?s)num-cpus: 1 is not of type 'string'.*'replicaz' was unexpected"):
        validate_rayservice(bad)


def test_serve_config_v2(objects, chart):
    config = chart.serve_config_v2(chart.only(objects, "RayService"))
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert config["grpc_options"] == {"port": 9000, "grpc_servicer_functions": SERVICERS}
    (app,) = config["applications"]
    assert (app["name"], app["route_prefix"], app["import_path"]) == ("moecluster", "/", "cluster.serving.app:build")
    # the args are a valid ServeConfig (build() reads them so), whose model is where the storage is mounted, or
    # unset for the embedded model, which every pod's install carries
    ServeConfig.model_validate(app["args"])
    head = chart.only(objects, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m for m in head["containers"][0].get("volumeMounts") or []}
    assert app["args"].get("model") == (mounts["model"]["mountPath"] if "model" in mounts else None)
    # the live fields go to the deployment's user_config, and the whole is a ServeConfig again
    (deployment,) = app["deployments"]
    assert deployment["name"] == "MoEServer"
    assert set(deployment["user_config"]) <= LIVE_FIELDS
    chart.running_config(config)  # raises unless args and user_config make a valid ServeConfig again
    # serving replicas ask for a resource that the head offers one unit of, and only serving-group pods besides
    (resource,) = deployment["ray_actor_options"]["resources"]
    head_params = chart.only(objects, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
    assert f'\\"{resource}\\": 1' in head_params["resources"]
    for name, group in chart.worker_groups(objects).items():
        assert (resource in group["rayStartParams"].get("resources", "")) == (name == "serving"), name


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def test_the_serve_section_is_the_running_config(render, chart):
    """args, user_config and the scaling options together are the `serve` section, no field lost or added."""
    defaults = yaml.safe_load((chart.CHART / "values.yaml").read_text())["serve"]
    values = yaml.safe_load(chart.CI_VALUES.read_text())["serve"]
    config = chart.serve_config_v2(chart.only(render(values_files=[chart.CI_VALUES]), "RayService"))
    expected = ServeConfig.model_validate({**_merge(defaults, values), "model": "/models/qwen3-moe"})
    assert chart.running_config(config) == expected


def test_expert_replicas_land_in_serve_config_as_the_cli_reads_them(render, chart, tmp_path):
    objects = render(sets=["serve.expert_replicas.3:7=4", "serve.num_workers=3"])
    config = chart.running_config(chart.serve_config_v2(chart.only(objects, "RayService")))
    assert config.replica_counts() == {(3, 7): 4}
    assert chart.serve_user_config(objects)["expert_replicas"] == {"3:7": 4}  # live: no new version
    # the same config, as a `moecluster serve --config FILE` file, is the same config
    config_file = tmp_path / "serve.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump()))
    assert load_config(str(config_file)) == config
    assert load_config(str(config_file)).num_workers == 3


def test_a_cli_config_file_is_a_values_serve_section(render, chart, tmp_path):
    """The other way round: a --config file's contents, given as `serve`, render to the same config."""
    cli_config = {"num_workers": 4, "dtype": "bfloat16", "expert_replicas": {"1:2": 3},
                  "routing": {"policy": "hash", "hash_seed": 7}, "rebalance": {"enabled": True}, "num_replicas": 2,
                  "limits": {"max_n": 4, "frame_tensor_bytes": 1 << 30}}
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"serve": cli_config}))
    config = chart.running_config(chart.serve_config_v2(chart.only(render(values_files=[values]), "RayService")))
    config_file = tmp_path / "serve.yaml"
    config_file.write_text(yaml.safe_dump(cli_config))
    assert config == load_config(str(config_file))  # the embedded model: no model path


def test_scaling_one_expert_group_changes_only_that_group(render, chart):
    before = render(values_files=[chart.CI_VALUES])
    after = render(values_files=[chart.CI_VALUES], sets=["expertGroups.l4.replicas=7"])
    assert len(before) == len(after)
    for old, new in zip(before, after):
        if old["kind"] != "RayService":
            assert old == new
    old_spec = chart.only(before, "RayService")
    new_spec = chart.only(after, "RayService")
    old_groups, new_groups = chart.worker_groups(before), chart.worker_groups(after)
    assert list(old_groups) == list(new_groups) == ["a100", "h100", "l4", "serving"]
    assert (old_groups["l4"]["replicas"], new_groups["l4"]["replicas"]) == (2, 7)
    # everything else, the other groups and serveConfigV2 included, is identical
    new_groups["l4"]["replicas"] = 2
    assert chart.to_json(new_spec) == chart.to_json(old_spec)


def test_replicas_outside_min_max_are_refused(render, chart):
    with pytest.raises(chart.HelmError, match=r"expertGroups.experts: replicas \(5\) must lie between minReplicas "
                                               r"\(2\) and maxReplicas \(2\)"):
        render(sets=["expertGroups.experts.replicas=5"])


def test_service_monitor_renders_when_enabled(render, chart, validate_kubernetes):
    objects = render(sets=["serviceMonitor.enabled=true", "serviceMonitor.labels.release=prom"])
    monitor = chart.only(objects, "ServiceMonitor")
    metrics = chart.only(objects, "Service", "moecluster-metrics")
    serve_metrics = chart.only(objects, "Service", "-serve-metrics")
    validate_kubernetes(metrics)  # the ServiceMonitor's CRD is not available here: only its Services are checked
    validate_kubernetes(serve_metrics)
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics", "serve"]
    assert serve_metrics["spec"]["selector"]["app.kubernetes.io/component"] == "head"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= serve_metrics["metadata"]["labels"].items()
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == metrics["spec"]["ports"][0]["name"] == "metrics"
    # every Ray pod (head and expert workers) has the port the metrics Service targets
    spec = chart.only(objects, "RayService")["spec"]["rayClusterConfig"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for template in templates:
        assert metrics["spec"]["selector"].items() <= template["metadata"]["labels"].items()
        assert "metrics" in {p["name"] for p in template["spec"]["containers"][0]["ports"]}
    assert "ServiceMonitor" not in {o["kind"] for o in render()}


def test_services_reach_the_serve_ports(objects, chart):
    spec = chart.only(objects, "RayService")["spec"]["rayClusterConfig"]
    head = spec["headGroupSpec"]["template"]
    head_ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    for suffix, target, container_port in (("-http", "serve", 8000), ("-grpc", "grpc", 9000)):
        service = chart.only(objects, "Service", suffix)
        (port,) = service["spec"]["ports"]
        assert port["targetPort"] == target and head_ports[target] == container_port
        selector = service["spec"]["selector"]
        assert selector.pop("ray.io/serve") == "true"  # set by KubeRay on pods whose Serve proxy is healthy
        assert selector.items() <= head["metadata"]["labels"].items()


def test_every_container_runs_non_root_without_privileges(objects, chart):
    spec = chart.only(objects, "RayService")["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True and context["runAsUser"] == 1000
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]


def test_every_ray_container_starts_with_the_node_env(render, chart):
    objects = render(sets=["env[0].name=HF_HOME", "env[0].value=/cache"])
    spec = chart.only(objects, "RayService")["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert NODE_ENV.items() <= env.items() and env["HF_HOME"] == "/cache"
        assert ACTOR_ENV.items() <= env.items()  # the serving replica's ray_actor_options cannot drop it


def test_ray_start_params_are_strings(objects, chart):
    spec = chart.only(objects, "RayService")["spec"]["rayClusterConfig"]
    for params in [spec["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in spec["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in params.values()), params


def test_gcs_fault_tolerance_keeps_the_head_state_in_redis(render, chart, validate_rayservice):
    assert "gcsFaultToleranceOptions" not in chart.only(render(), "RayService")["spec"]["rayClusterConfig"]
    objects = render(sets=["gcsFaultTolerance.enabled=true", "gcsFaultTolerance.redisAddress=redis:6379",
                           "gcsFaultTolerance.redisPasswordSecret=redis-auth"])
    service = chart.only(objects, "RayService")
    validate_rayservice(service)
    options = service["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options == {"redisAddress": "redis:6379",
                       "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "password"}}}}
    with pytest.raises(chart.HelmError, match="gcsFaultTolerance.redisAddress is required"):
        render(sets=["gcsFaultTolerance.enabled=true"])


def test_the_grafana_dashboard_charts_metrics_the_server_exports(render, chart):
    import json
    import re
    from pathlib import Path

    assert "ConfigMap" not in {o["kind"] for o in render() if o["metadata"]["name"].endswith("-dashboard")}
    config_map = chart.only(render(sets=["grafanaDashboard.enabled=true"]), "ConfigMap", "-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["moecluster.json"])
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert any(p["type"] == "heatmap" and "moecluster_expert_tokens_total" in p["targets"][0]["expr"]
               for p in dashboard["panels"])
    exported = set(re.findall(r'"(moecluster_\w+)"', (Path(__file__).parents[2] / "cluster/serving/metrics.py").read_text()))
    used = {re.sub(r"_(total|bucket|count|sum)$", "", name) for q in queries for name in re.findall(r"moecluster_\w+", q)}
    assert used <= exported, used - exported
