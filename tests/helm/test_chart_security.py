"""The chart's hardening: Ray token authentication, the NetworkPolicy, and non-root containers with a read-only root
filesystem whose only writable paths are emptyDirs."""

import json
import posixpath

import pytest

SELECTOR = {"app.kubernetes.io/name": "moecluster", "app.kubernetes.io/instance": "moe"}  # conftest.RELEASE
RAY_AUTH_ENV = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}
CACHE_ENV = {"XDG_CACHE_HOME", "HF_HOME", "MOECLUSTER_CACHE", "TRITON_CACHE_DIR"}
VALUE_SETS = ["default", "ci"]


@pytest.fixture(scope="module", params=VALUE_SETS)
def objects(request, default_objects, ci_objects):
    return ci_objects if request.param == "ci" else default_objects


def cluster_spec(chart, objects) -> dict:
    return chart.only(objects, "RayService")["spec"]["rayClusterConfig"]


def pod_templates(chart, objects) -> dict[str, dict]:
    """Every Ray pod template, by group: the head and each expert group."""
    spec = cluster_spec(chart, objects)
    return {"head": spec["headGroupSpec"]["template"], **{g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}}


# --- Ray token authentication ---

def test_ray_token_auth_is_on_for_the_whole_ray_cluster(objects, chart, validate_rayservice):
    """KubeRay's authOptions: it puts RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (from the Secret) into every Ray pod's
    Ray container (containers[0]), their wait-gcs-ready init container and the autoscaler sidecar."""
    service = chart.only(objects, "RayService")
    validate_rayservice(service)
    options = cluster_spec(chart, objects)["authOptions"]
    assert options["mode"] == "token"
    assert set(options) <= {"mode", "secretName"}  # never enableK8sTokenAuth: KubeRay refuses it for a RayService
    for group, template in pod_templates(chart, objects).items():
        containers = template["spec"]["containers"]
        # KubeRay injects the token into containers[0] only: that must be the Ray container, and the only one
        assert [c["name"] for c in containers] == ["ray-head" if group == "head" else "ray-worker"], group
        # a container's own RAY_AUTH_* would win over KubeRay's, so the chart sets none
        for container in containers + template["spec"].get("initContainers", []):
            assert not RAY_AUTH_ENV & {e["name"] for e in container.get("env", [])}, (group, container["name"])


def test_the_token_comes_from_an_existing_secret(render, chart, validate_rayservice):
    objects = render(sets=["rayAuth.tokenSecret.name=ray-token", "autoscaling.enabled=true"])
    validate_rayservice(chart.only(objects, "RayService"))
    assert cluster_spec(chart, objects)["authOptions"] == {"mode": "token", "secretName": "ray-token"}
    # no Secret of the chart's own: KubeRay reads the key auth_token of the one named
    assert "Secret" not in {o["kind"] for o in objects}


def test_without_a_secret_kuberay_generates_the_token(default_objects, chart):
    assert cluster_spec(chart, default_objects)["authOptions"] == {"mode": "token"}
    assert "Secret" not in {o["kind"] for o in default_objects}


def test_ray_token_auth_can_be_turned_off(render, chart, validate_rayservice):
    objects = render(sets=["rayAuth.enabled=false", "rayAuth.tokenSecret.name=ignored"])
    validate_rayservice(chart.only(objects, "RayService"))
    assert "authOptions" not in cluster_spec(chart, objects)


@pytest.mark.parametrize("values, message", [
    ({"sets": ["env[0].name=RAY_AUTH_MODE", "env[0].value=disabled"]}, "env sets RAY_AUTH_MODE"),
    ({"sets": ["env[0].name=RAY_AUTH_TOKEN", "env[0].value=secret"]}, "env sets RAY_AUTH_TOKEN"),
    ({"sets": ["autoscaling.enabled=true", "autoscaling.options.env[0].name=RAY_AUTH_TOKEN_PATH",
               "autoscaling.options.env[0].value=/t"]}, "env sets RAY_AUTH_TOKEN_PATH"),
    ({"sets": ["rayVersion=2.51.1"]}, "rayAuth.enabled needs Ray 2.52.0 or newer"),
], ids=["mode in env", "token in env", "token path in the autoscaler's env", "old ray"])
def test_settings_that_would_defeat_token_auth_are_refused(values, message, render, chart):
    with pytest.raises(chart.HelmError, match=message):
        render(**values)


def test_with_token_auth_off_env_may_set_ray_auth(render, chart):
    objects = render(sets=["rayAuth.enabled=false", "env[0].name=RAY_AUTH_MODE", "env[0].value=disabled", "rayVersion=2.51.1"])
    assert "authOptions" not in cluster_spec(chart, objects)


# --- NetworkPolicy ---

def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"the check knows matchLabels only: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _peer_matches(peer: dict, source: dict, namespace: str) -> bool:
    """Whether a NetworkPolicyPeer admits `source`: {"pod": labels, "namespace": name, "ns_labels": labels} for a
    pod, {"ip": ...} for anything outside the cluster's pods."""
    if "ipBlock" in peer:
        return False  # no test source is inside the ipBlocks used here
    if "pod" not in source:
        return False
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], source["ns_labels"]):
            return False
    elif source["namespace"] != namespace:
        return False
    return "podSelector" not in peer or _selects(peer["podSelector"], source["pod"])


def reachable_ports(policy: dict, source: dict) -> set | str:
    """The ports of the selected pods that `source` may reach: "all", or a set of port names/numbers."""
    namespace = policy["metadata"].get("namespace", "serving")
    ports: set = set()
    for rule in policy["spec"]["ingress"]:
        peers = rule.get("from")
        if peers is not None and not any(_peer_matches(p, source, namespace) for p in peers):
            continue
        if "ports" not in rule:
            return "all"
        ports |= {p["port"] for p in rule["ports"]}
    return ports


def external():
    return {"ip": "203.0.113.7"}


def pod(labels: dict, namespace: str = "serving"):
    return {"pod": labels, "namespace": namespace, "ns_labels": {"kubernetes.io/metadata.name": namespace}}


OPERATOR = pod({"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator"},
               "kuberay-system")


def test_the_network_policy_selects_every_ray_pod_of_the_release(objects, chart, validate_kubernetes):
    policy = chart.only(objects, "NetworkPolicy")
    validate_kubernetes(policy)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["podSelector"] == {"matchLabels": SELECTOR}
    for group, template in pod_templates(chart, objects).items():
        assert _selects(policy["spec"]["podSelector"], template["metadata"]["labels"]), group


def test_release_pods_reach_each_other_on_any_port(objects, chart):
    """Ray's GCS, raylets, object managers and the expert workers' gRPC servers use ports Ray picks."""
    policy = chart.only(objects, "NetworkPolicy")
    for group, template in pod_templates(chart, objects).items():
        assert reachable_ports(policy, pod(template["metadata"]["labels"])) == "all", group


def test_from_elsewhere_only_the_serving_ports_are_open(objects, chart):
    policy = chart.only(objects, "NetworkPolicy")
    public = {"serve", "grpc"}
    if any(o["kind"] == "ServiceMonitor" for o in objects):
        public.add("metrics")  # the scraper's
    others = {
        "outside the cluster": external(),
        "another pod of the namespace": pod({"app": "web"}),
        "another release of the chart": pod({**SELECTOR, "app.kubernetes.io/instance": "other"}),
        "a pod of the same name in another namespace": pod(SELECTOR, "elsewhere"),
    }
    for name, source in others.items():
        assert reachable_ports(policy, source) == public, name
    # the KubeRay operator may reach the head's dashboard too, for Serve's deployment and status
    assert reachable_ports(policy, OPERATOR) == public | {"dashboard"}
    # each port name is the Ray container's port the chart's Services target
    ports = {t: {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
             for t, template in pod_templates(chart, objects).items()}
    assert {name: ports["head"][name] for name in public | {"dashboard"}} == {
        "serve": 8000, "grpc": 9000, "dashboard": 8265, **({"metrics": 8080} if "metrics" in public else {})}
    for service in (o for o in objects if o["kind"] == "Service"):
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= public, service["metadata"]["name"]


def test_extra_ingress_sources_and_no_operator_rule(render, chart, validate_kubernetes):
    bastion = {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}}}],
               "ports": [{"port": "dashboard", "protocol": "TCP"}, {"port": "client", "protocol": "TCP"}]}
    objects = render(sets=["networkPolicy.kuberayOperator=null"],
                     set_jsons=[f"networkPolicy.extraIngress={json.dumps([bastion])}"])
    policy = chart.only(objects, "NetworkPolicy")
    validate_kubernetes(policy)
    assert reachable_ports(policy, pod({"app": "shell"}, "ops")) == {"serve", "grpc", "dashboard", "client"}
    assert reachable_ports(policy, OPERATOR) == {"serve", "grpc"}
    assert reachable_ports(policy, external()) == {"serve", "grpc"}


def test_the_network_policy_can_be_left_out(render):
    assert "NetworkPolicy" not in {o["kind"] for o in render(sets=["networkPolicy.enabled=false"])}


# --- non-root, read-only root filesystem ---

def test_every_pod_runs_as_the_ray_user_with_the_default_seccomp_profile(objects, chart):
    for group, template in pod_templates(chart, objects).items():
        context = template["spec"]["securityContext"]
        assert context["runAsNonRoot"] is True, group
        assert context["runAsUser"] == 1000, group
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, group


def _containers(template: dict) -> list[dict]:
    return template["spec"]["containers"] + template["spec"].get("initContainers", [])


@pytest.mark.parametrize("field, expected", [
    ("runAsNonRoot", True),
    ("runAsUser", 1000),
    ("allowPrivilegeEscalation", False),
    ("capabilities", {"drop": ["ALL"]}),
    ("seccompProfile", {"type": "RuntimeDefault"}),
    ("readOnlyRootFilesystem", True),
])
def test_every_container_is_locked_down(field, expected, objects, chart):
    for group, template in pod_templates(chart, objects).items():
        for container in _containers(template):
            assert container["securityContext"][field] == expected, (group, container["name"])


def _writable_dirs(template: dict, container: dict) -> list[str]:
    """The mount paths of `container` that are writable emptyDirs."""
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    return [m["mountPath"] for m in container.get("volumeMounts", [])
            if "emptyDir" in volumes[m["name"]] and not m.get("readOnly")]


def _under(path: str, dirs: list[str]) -> bool:
    path = posixpath.normpath(path)
    return path.startswith("/") and any(
        path == posixpath.normpath(d) or path.startswith(posixpath.normpath(d) + "/") for d in dirs)


STORAGE = {"embedded": [], "demo": ["modelStorage.type=demo"], "download": ["modelStorage.type=download", "modelStorage.download.repoId=org/model"]}


@pytest.mark.parametrize("storage", STORAGE)
def test_where_ray_and_python_write_is_a_writable_empty_dir(storage, render, chart, validate_rayservice):
    """/tmp (Ray's session dir /tmp/ray, Python's tempfile) and every cache directory the chart's env points at."""
    objects = render(sets=STORAGE[storage])
    validate_rayservice(chart.only(objects, "RayService"))
    for group, template in pod_templates(chart, objects).items():
        for container in _containers(template):
            where = (group, container["name"])
            writable = _writable_dirs(template, container)
            assert _under("/tmp/ray", writable), where
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert CACHE_ENV <= env.keys(), where
            for name in CACHE_ENV:
                assert _under(env[name], writable), (*where, name, env[name])
            # the MOECLUSTER_CACHE default, ~/.cache/moecluster, is writable even without the variable
            assert _under("/home/ray/.cache/moecluster", writable), where
        model = template["spec"].get("initContainers", [])
        if storage == "download":
            (init,) = model
            mount = next(m["mountPath"] for m in init["volumeMounts"] if m["name"] == "model")
            assert _under(mount, _writable_dirs(template, init))


def test_a_value_of_env_wins_over_the_chart_cache_variables(render, chart):
    objects = render(sets=["env[0].name=HF_HOME", "env[0].value=/models/hf"])
    for template in pod_templates(chart, objects).values():
        names = [e["name"] for e in template["spec"]["containers"][0]["env"]]
        assert names.count("HF_HOME") == 1
        assert template["spec"]["containers"][0]["env"][-1] == {"name": "HF_HOME", "value": "/models/hf"}


def test_the_security_contexts_are_values(render, chart):
    objects = render(sets=["securityContext.readOnlyRootFilesystem=false", "podSecurityContext.runAsUser=2000",
                           "securityContext.runAsUser=2000"])
    for template in pod_templates(chart, objects).values():
        assert template["spec"]["securityContext"]["runAsUser"] == 2000
        for container in _containers(template):
            assert container["securityContext"]["readOnlyRootFilesystem"] is False
            assert container["securityContext"]["runAsUser"] == 2000
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}  # the rest stays


def test_the_autoscaler_sidecar_is_locked_down_too(render, chart, validate_rayservice):
    objects = render(sets=["autoscaling.enabled=true", "autoscaling.options.idleTimeoutSeconds=60"])
    validate_rayservice(chart.only(objects, "RayService"))
    options = cluster_spec(chart, objects)["autoscalerOptions"]
    head = pod_templates(chart, objects)["head"]
    assert options["idleTimeoutSeconds"] == 60
    assert options["securityContext"] == head["spec"]["containers"][0]["securityContext"]
    assert options["securityContext"]["readOnlyRootFilesystem"] is True
    (mount,) = options["volumeMounts"]
    assert mount["mountPath"] == "/tmp" and "emptyDir" in next(
        v for v in head["spec"]["volumes"] if v["name"] == mount["name"])
    # the values' own autoscalerOptions win
    objects = render(sets=["autoscaling.enabled=true", "autoscaling.options.securityContext.readOnlyRootFilesystem=false"])
    assert cluster_spec(chart, objects)["autoscalerOptions"]["securityContext"]["readOnlyRootFilesystem"] is False
