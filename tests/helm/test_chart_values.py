"""One assertion per value, as KubeRay's chart tests do: set the value, find where it lands in what the chart renders.

Every documented value of values.yaml has a case here (test_every_value_has_a_case checks it).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

RELEASE = "moe"  # conftest.RELEASE
GCS = ["gcsFaultTolerance.enabled=true", "gcsFaultTolerance.redisAddress=redis:6379"]


def rayservice(objs):
    return next(o for o in objs if o["kind"] == "RayService")


def cluster(objs):
    return rayservice(objs)["spec"]["rayClusterConfig"]


def head(objs):
    return cluster(objs)["headGroupSpec"]


def head_pod(objs):
    return head(objs)["template"]["spec"]


def head_container(objs):
    return head_pod(objs)["containers"][0]


def group(objs, name="experts"):
    return next(g for g in cluster(objs)["workerGroupSpecs"] if g["groupName"] == name)


def worker_pod(objs):
    return group(objs)["template"]["spec"]


def worker_container(objs):
    return worker_pod(objs)["containers"][0]


def init_container(objs):
    (init,) = worker_pod(objs)["initContainers"]
    return init


def model_volume(objs):
    return next(v for v in worker_pod(objs)["volumes"] if v["name"] == "model")


def volume(objs, name):
    return next(v for v in worker_pod(objs)["volumes"] if v["name"] == name)


def model_mount(objs):
    return next(m for m in worker_container(objs)["volumeMounts"] if m["name"] == "model")


def app(objs):
    import yaml

    return yaml.safe_load(rayservice(objs)["spec"]["serveConfigV2"])["applications"][0]


def args(objs):
    """The application's args: the version's fields of `serve`."""
    return app(objs)["args"]


def deployment(objs):
    return app(objs)["deployments"][0]


def live(objs):
    """The deployment's user_config: the live fields of `serve`."""
    return deployment(objs)["user_config"]


def serving(objs):
    return group(objs, "serving")


def serving_pod(objs):
    return serving(objs)["template"]["spec"]


def env_of(container, name):
    return next(e for e in container["env"] if e["name"] == name)


def kind(objs, kind_name, suffix=""):
    found = [o for o in objs if o["kind"] == kind_name and o["metadata"]["name"].endswith(suffix)]
    return found[0] if found else None


def pvc(objs):
    return kind(objs, "PersistentVolumeClaim")


def service(suffix):
    return lambda objs: kind(objs, "Service", suffix)


@dataclass
class Case:
    key: str  # the value it covers, as a dotted path in values.yaml
    sets: list[str]
    get: Callable[[list[dict]], Any]
    expected: Any
    set_strings: list[str] = field(default_factory=list)
    set_jsons: list[str] = field(default_factory=list)


PVC = ["modelStorage.type=pvc"]
SERVING = ["servingGroup.enabled=true"]
DOWNLOAD = ["modelStorage.type=download", "modelStorage.download.repoId=org/model"]
AFFINITY = '{"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":{"nodeSelectorTerms":' \
           '[{"matchExpressions":[{"key":"pool","operator":"In","values":["gpu"]}]}]}}}'

CASES = [
    Case("nameOverride", ["nameOverride=llm"], lambda o: rayservice(o)["metadata"]["name"], f"{RELEASE}-llm"),
    Case("fullnameOverride", ["fullnameOverride=serving"], lambda o: service("-grpc")(o)["metadata"]["name"],
         "serving-grpc"),
    Case("image.repository", ["image.repository=reg.example.com/moecluster"], lambda o: head_container(o)["image"],
         "reg.example.com/moecluster:0.1.0"),
    Case("image.tag", ["image.tag=0.2.0-gpu"], lambda o: worker_container(o)["image"], "moecluster:0.2.0-gpu"),
    Case("image.pullPolicy", ["image.pullPolicy=Always"], lambda o: worker_container(o)["imagePullPolicy"], "Always"),
    Case("imagePullSecrets", ["imagePullSecrets[0].name=regcred"], lambda o: worker_pod(o)["imagePullSecrets"],
         [{"name": "regcred"}]),
    Case("rayVersion", ["rayVersion=2.60.1"], lambda o: cluster(o)["rayVersion"], "2.60.1"),
    Case("serviceAccountName", ["serviceAccountName=moe-sa"], lambda o: worker_pod(o)["serviceAccountName"],
         "moe-sa"),
    Case("env", ["env[0].name=RAY_DEDUP_LOGS"], lambda o: head_container(o)["env"][-1],
         {"name": "RAY_DEDUP_LOGS", "value": "0"}, set_strings=["env[0].value=0"]),
    Case("podSecurityContext", ["podSecurityContext.fsGroup=2000"], lambda o: worker_pod(o)["securityContext"]["fsGroup"],
         2000),
    Case("securityContext", ["securityContext.readOnlyRootFilesystem=false"],
         lambda o: head_container(o)["securityContext"]["readOnlyRootFilesystem"], False),
    Case("scratch.tmp.sizeLimit", ["scratch.tmp.sizeLimit=20Gi"], lambda o: volume(o, "tmp"),
         {"name": "tmp", "emptyDir": {"sizeLimit": "20Gi"}}),
    Case("scratch.cache.sizeLimit", ["scratch.cache.sizeLimit=5Gi"], lambda o: volume(o, "cache"),
         {"name": "cache", "emptyDir": {"sizeLimit": "5Gi"}}),
    # serve: ServeConfig fields; the version's into the application's args, the live ones into the deployment's
    # user_config, the scaling ones into Serve's options
    Case("serve.engine", ["serve.engine=vllm"], lambda o: args(o)["engine"], "vllm"),
    Case("serve.model_name", ["serve.model_name=qwen3"], lambda o: args(o)["model_name"], "qwen3"),
    Case("serve.dtype", ["serve.dtype=bfloat16"], lambda o: args(o)["dtype"], "bfloat16"),
    Case("serve.num_workers", ["serve.num_workers=6"], lambda o: args(o)["num_workers"], 6),
    # helm's --set reads 2.5 as a string: fractions go through --set-json
    Case("serve.worker_cpus", [], lambda o: args(o)["worker_cpus"], 2.5, set_jsons=["serve.worker_cpus=2.5"]),
    Case("serve.worker_gpus", [], lambda o: args(o)["worker_gpus"], 0.5, set_jsons=["serve.worker_gpus=0.5"]),
    Case("serve.serving_gpus", [], lambda o: (args(o)["serving_gpus"], deployment(o)["ray_actor_options"]["num_gpus"]),
         (1.0, 1.0), set_jsons=["serve.serving_gpus=1.0"]),
    Case("serve.placement", ["serve.placement=by_layer"], lambda o: args(o)["placement"], "by_layer"),
    Case("serve.expert_replicas", ["serve.expert_replicas.3:7=2"], lambda o: live(o)["expert_replicas"], {"3:7": 2}),
    Case("serve.routing.policy", ["serve.routing.policy=hash"], lambda o: live(o)["routing"]["policy"], "hash"),
    Case("serve.routing.overflow", ["serve.routing.overflow=drop"], lambda o: live(o)["routing"]["overflow"], "drop"),
    Case("serve.routing.hash_seed", ["serve.routing.hash_seed=9"], lambda o: live(o)["routing"]["hash_seed"], 9),
    Case("serve.rebalance.enabled", ["serve.rebalance.enabled=true"], lambda o: live(o)["rebalance"]["enabled"], True),
    Case("serve.rebalance.interval_s", ["serve.rebalance.interval_s=15"],
         lambda o: live(o)["rebalance"]["interval_s"], 15),
    Case("serve.rebalance.window_s", ["serve.rebalance.window_s=30"], lambda o: live(o)["rebalance"]["window_s"], 30),
    Case("serve.expert_timeout_s", ["serve.expert_timeout_s=5"], lambda o: live(o)["expert_timeout_s"], 5),
    Case("serve.hedge.enabled", ["serve.hedge.enabled=false"], lambda o: live(o)["hedge"]["enabled"], False),
    Case("serve.hedge.factor", ["serve.hedge.factor=8"], lambda o: live(o)["hedge"]["factor"], 8),
    Case("serve.hedge.min_ms", ["serve.hedge.min_ms=50"], lambda o: live(o)["hedge"]["min_ms"], 50),
    Case("serve.hedge.budget", [], lambda o: live(o)["hedge"]["budget"], 0.1, set_jsons=["serve.hedge.budget=0.1"]),
    Case("serve.startup_timeout_s", ["serve.startup_timeout_s=900"], lambda o: args(o)["startup_timeout_s"], 900),
    Case("serve.max_batch_size", ["serve.max_batch_size=8"], lambda o: live(o)["max_batch_size"], 8),
    Case("serve.max_waiting", ["serve.max_waiting=10"], lambda o: live(o)["max_waiting"], 10),
    Case("serve.default_max_tokens", ["serve.default_max_tokens=64"], lambda o: live(o)["default_max_tokens"], 64),
    Case("serve.stream_interval", ["serve.stream_interval=8"], lambda o: live(o)["stream_interval"], 8),
    Case("serve.model", ["serve.model=/models/checkpoint/v2"], lambda o: args(o)["model"], "/models/checkpoint/v2"),
    Case("serve.routing.capacity_factor", [], lambda o: live(o)["routing"]["capacity_factor"], 1.5,
         set_jsons=["serve.routing.capacity_factor=1.5"]),
    Case("serve.num_replicas", ["serve.num_replicas=3"], lambda o: deployment(o)["num_replicas"], 3),
    Case("serve.autoscaling", [], lambda o: ("num_replicas" in deployment(o), deployment(o)["autoscaling_config"]),
         (False, {"min_replicas": 2, "max_replicas": 6, "target_ongoing_requests": 8, "upscale_delay_s": 5,
                  "downscale_delay_s": 60}),
         set_jsons=['serve.autoscaling={"min_replicas":2,"max_replicas":6,"target_ongoing_requests":8}']),
    Case("serve.limits.max_n", ["serve.limits.max_n=4"], lambda o: (live(o)["limits"], "limits" in args(o)),
         ({"max_n": 4}, False)),
    Case("serve.limits.frame_message_bytes", ["serve.limits.frame_message_bytes=1048576"],
         lambda o: (args(o)["limits"], "limits" in live(o)), ({"frame_message_bytes": 1048576}, False)),
    # modelStorage
    Case("modelStorage.type", ["modelStorage.type=hostPath"], lambda o: "hostPath" in model_volume(o), True),
    Case("modelStorage.type", ["modelStorage.type=embedded"], lambda o: ("model" in args(o), "initContainers" in worker_pod(o),
                                             "model" in [v["name"] for v in worker_pod(o)["volumes"]]),
         (False, False, False)),
    Case("modelStorage.mountPath", ["modelStorage.type=demo", "modelStorage.mountPath=/srv/model"], lambda o: model_mount(o)["mountPath"],
         "/srv/model"),
    Case("modelStorage.mountPath", ["modelStorage.type=demo", "modelStorage.mountPath=/srv/model"], lambda o: args(o)["model"], "/srv/model"),
    Case("modelStorage.demo.arch", ["modelStorage.type=demo", "modelStorage.demo.arch=olmoe"], lambda o: init_container(o)["command"][:5],
         ["moecluster", "init-model", "/models/checkpoint", "--arch", "olmoe"]),
    Case("modelStorage.demo.seed", ["modelStorage.type=demo", "modelStorage.demo.seed=3"], lambda o: init_container(o)["command"][-2:],
         ["--seed", "3"]),
    Case("modelStorage.pvc.existingClaim", PVC + ["modelStorage.pvc.existingClaim=qwen3"],
         lambda o: model_volume(o)["persistentVolumeClaim"], {"claimName": "qwen3", "readOnly": True}),
    Case("modelStorage.pvc.create", PVC + ["modelStorage.pvc.create=true"],
         lambda o: (pvc(o)["metadata"]["name"], model_volume(o)["persistentVolumeClaim"]["claimName"]),
         (f"{RELEASE}-moecluster-models", f"{RELEASE}-moecluster-models")),
    Case("modelStorage.pvc.subPath", PVC + ["modelStorage.pvc.existingClaim=all", "modelStorage.pvc.subPath=qwen3"],
         lambda o: model_mount(o)["subPath"], "qwen3"),
    Case("modelStorage.pvc.accessModes", PVC + ["modelStorage.pvc.create=true", "modelStorage.pvc.accessModes={ReadOnlyMany}"],
         lambda o: pvc(o)["spec"]["accessModes"], ["ReadOnlyMany"]),
    Case("modelStorage.pvc.size", PVC + ["modelStorage.pvc.create=true", "modelStorage.pvc.size=1Ti"],
         lambda o: pvc(o)["spec"]["resources"]["requests"]["storage"], "1Ti"),
    Case("modelStorage.pvc.storageClassName", PVC + ["modelStorage.pvc.create=true", "modelStorage.pvc.storageClassName=nfs"],
         lambda o: pvc(o)["spec"]["storageClassName"], "nfs"),
    Case("modelStorage.hostPath.path", ["modelStorage.type=hostPath", "modelStorage.hostPath.path=/data/qwen3"],
         lambda o: model_volume(o)["hostPath"]["path"], "/data/qwen3"),
    Case("modelStorage.hostPath.type", ["modelStorage.type=hostPath", "modelStorage.hostPath.type=DirectoryOrCreate"],
         lambda o: model_volume(o)["hostPath"]["type"], "DirectoryOrCreate"),
    Case("modelStorage.download.repoId", DOWNLOAD, lambda o: init_container(o)["command"][3], "org/model"),
    Case("modelStorage.download.revision", DOWNLOAD + ["modelStorage.download.revision=v1.0"],
         lambda o: init_container(o)["command"][4], "v1.0"),
    Case("modelStorage.download.env", DOWNLOAD + ["modelStorage.download.env[0].name=HF_TOKEN",
                                                  "modelStorage.download.env[0].value=secret"],
         lambda o: init_container(o)["env"][-1], {"name": "HF_TOKEN", "value": "secret"}),
    Case("modelStorage.download.sizeLimit", DOWNLOAD + ["modelStorage.download.sizeLimit=5Gi"],
         lambda o: model_volume(o)["emptyDir"]["sizeLimit"], "5Gi"),
    Case("modelStorage.download.resources", DOWNLOAD + ["modelStorage.download.resources.limits.memory=4Gi"],
         lambda o: init_container(o)["resources"], {"limits": {"memory": "4Gi"}}),
    # head
    Case("head.rayStartParams", [], lambda o: head(o)["rayStartParams"]["num-cpus"], "2",
         set_strings=["head.rayStartParams.num-cpus=2"]),
    Case("head.resources", ["head.resources.limits.memory=16Gi"],
         lambda o: head_container(o)["resources"]["limits"]["memory"], "16Gi"),
    Case("head.nodeSelector", ["head.nodeSelector.pool=cpu"], lambda o: head_pod(o)["nodeSelector"], {"pool": "cpu"}),
    Case("head.tolerations", ["head.tolerations[0].key=dedicated", "head.tolerations[0].operator=Exists"],
         lambda o: head_pod(o)["tolerations"], [{"key": "dedicated", "operator": "Exists"}]),
    Case("head.affinity", [], lambda o: head_pod(o)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
         ["nodeSelectorTerms"][0]["matchExpressions"][0]["values"], ["gpu"], set_jsons=[f"head.affinity={AFFINITY}"]),
    Case("head.labels", ["head.labels.team=ml"], lambda o: head(o)["template"]["metadata"]["labels"]["team"], "ml"),
    Case("head.annotations", ["head.annotations.owner=ml"],
         lambda o: head(o)["template"]["metadata"]["annotations"], {"owner": "ml"}),
    # an expert group
    Case("expertGroups.experts.replicas", ["expertGroups.experts.replicas=3", "expertGroups.experts.maxReplicas=4"],
         lambda o: group(o)["replicas"], 3),
    Case("expertGroups.experts.minReplicas", ["expertGroups.experts.minReplicas=1"],
         lambda o: group(o)["minReplicas"], 1),
    Case("expertGroups.experts.maxReplicas", ["expertGroups.experts.maxReplicas=8"],
         lambda o: group(o)["maxReplicas"], 8),
    Case("expertGroups.experts.gpus", ["expertGroups.experts.gpus=2"],
         lambda o: worker_container(o)["resources"]["limits"]["nvidia.com/gpu"], 2),
    Case("expertGroups.experts.gpuResourceName", ["expertGroups.experts.gpus=1", "expertGroups.experts.gpuResourceName=amd.com/gpu"],
         lambda o: worker_container(o)["resources"]["limits"].get("amd.com/gpu"), 1),
    Case("expertGroups.experts.rayStartParams", [], lambda o: group(o)["rayStartParams"], {"num-gpus": "1"},
         set_strings=["expertGroups.experts.rayStartParams.num-gpus=1"]),
    Case("expertGroups.experts.resources", ["expertGroups.experts.resources.limits.cpu=6"],
         lambda o: worker_container(o)["resources"]["limits"]["cpu"], 6),
    Case("expertGroups.experts.nodeSelector", ["expertGroups.experts.nodeSelector.pool=gpu"],
         lambda o: worker_pod(o)["nodeSelector"], {"pool": "gpu"}),
    Case("expertGroups.experts.tolerations", ["expertGroups.experts.tolerations[0].key=nvidia.com/gpu",
                                              "expertGroups.experts.tolerations[0].effect=NoSchedule"],
         lambda o: worker_pod(o)["tolerations"], [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]),
    Case("expertGroups.experts.affinity", [], lambda o: worker_pod(o)["affinity"]["nodeAffinity"]
         ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchExpressions"][0]["key"],
         "pool", set_jsons=[f"expertGroups.experts.affinity={AFFINITY}"]),
    Case("expertGroups.experts.labels", ["expertGroups.experts.labels.tier=spot"],
         lambda o: group(o)["template"]["metadata"]["labels"]["tier"], "spot"),
    Case("expertGroups.experts.annotations", ["expertGroups.experts.annotations.owner=ml"],
         lambda o: group(o)["template"]["metadata"]["annotations"], {"owner": "ml"}),
    Case("expertGroups", ["expertGroups.h100.replicas=1", "expertGroups.h100.minReplicas=0",
                          "expertGroups.h100.maxReplicas=2", "expertGroups.h100.gpus=8"],
         lambda o: (group(o, "h100")["template"]["metadata"]["labels"]["moecluster.io/expert-group"],
                    group(o, "h100")["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]),
         ("h100", 8)),
    # the serving group
    Case("servingGroup.enabled", ["servingGroup.enabled=true"], lambda o: serving(o)["rayStartParams"]["resources"],
         '"{\\"moecluster-serving\\": 1}"'),
    Case("servingGroup.replicas", SERVING + ["servingGroup.replicas=2"], lambda o: serving(o)["replicas"], 2),
    Case("servingGroup.minReplicas", SERVING + ["servingGroup.minReplicas=1"], lambda o: serving(o)["minReplicas"], 1),
    Case("servingGroup.maxReplicas", SERVING + ["servingGroup.maxReplicas=8"], lambda o: serving(o)["maxReplicas"], 8),
    Case("servingGroup.replicasPerPod", SERVING + ["servingGroup.replicasPerPod=3"],
         lambda o: serving(o)["rayStartParams"], {"num-cpus": "3", "resources": '"{\\"moecluster-serving\\": 3}"'}),
    Case("servingGroup.gpus", SERVING + ["servingGroup.gpus=1"],
         lambda o: serving_pod(o)["containers"][0]["resources"]["limits"]["nvidia.com/gpu"], 1),
    Case("servingGroup.gpuResourceName", SERVING + ["servingGroup.gpus=1", "servingGroup.gpuResourceName=amd.com/gpu"],
         lambda o: serving_pod(o)["containers"][0]["resources"]["limits"].get("amd.com/gpu"), 1),
    Case("servingGroup.rayStartParams", SERVING, lambda o: serving(o)["rayStartParams"]["num-cpus"], "2",
         set_strings=["servingGroup.rayStartParams.num-cpus=2"]),
    Case("servingGroup.resources", SERVING + ["servingGroup.resources.limits.memory=32Gi"],
         lambda o: serving_pod(o)["containers"][0]["resources"]["limits"]["memory"], "32Gi"),
    Case("servingGroup.nodeSelector", SERVING + ["servingGroup.nodeSelector.pool=cpu"],
         lambda o: serving_pod(o)["nodeSelector"], {"pool": "cpu"}),
    Case("servingGroup.tolerations", SERVING + ["servingGroup.tolerations[0].key=dedicated",
                                                "servingGroup.tolerations[0].operator=Exists"],
         lambda o: serving_pod(o)["tolerations"], [{"key": "dedicated", "operator": "Exists"}]),
    Case("servingGroup.affinity", SERVING, lambda o: serving_pod(o)["affinity"]["nodeAffinity"]
         ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchExpressions"][0]["key"],
         "pool", set_jsons=[f"servingGroup.affinity={AFFINITY}"]),
    Case("servingGroup.labels", SERVING + ["servingGroup.labels.tier=spot"],
         lambda o: serving(o)["template"]["metadata"]["labels"]["tier"], "spot"),
    Case("servingGroup.annotations", SERVING + ["servingGroup.annotations.owner=ml"],
         lambda o: serving(o)["template"]["metadata"]["annotations"], {"owner": "ml"}),
    # autoscaling, TLS
    Case("autoscaling.enabled", ["autoscaling.enabled=true"], lambda o: cluster(o)["enableInTreeAutoscaling"], True),
    Case("autoscaling.options", ["autoscaling.enabled=true", "autoscaling.options.idleTimeoutSeconds=120"],
         lambda o: cluster(o)["autoscalerOptions"]["idleTimeoutSeconds"], 120),
    Case("tls.enabled", ["tls.enabled=true"], lambda o: cluster(o)["tlsOptions"], {"enabled": True}),
    Case("rayAuth.enabled", ["rayAuth.enabled=false"], lambda o: "authOptions" in cluster(o), False),
    Case("rayAuth.tokenSecret.name", ["rayAuth.tokenSecret.name=ray-token"], lambda o: cluster(o)["authOptions"],
         {"mode": "token", "secretName": "ray-token"}),
    Case("auth.apiKeySecret", ["auth.apiKeySecret=moe-keys"],
         lambda o: env_of(head_container(o), "MOECLUSTER_API_KEY")["valueFrom"]["secretKeyRef"]["name"], "moe-keys"),
    Case("auth.apiKeySecretKey", ["auth.apiKeySecret=moe-keys", "auth.apiKeySecretKey=k"],
         lambda o: env_of(head_container(o), "MOECLUSTER_API_KEY")["valueFrom"]["secretKeyRef"]["key"], "k"),
    Case("gcsFaultTolerance.enabled", GCS, lambda o: cluster(o)["gcsFaultToleranceOptions"]["redisAddress"],
         "redis:6379"),
    Case("gcsFaultTolerance.redisAddress", [*GCS[:1], "gcsFaultTolerance.redisAddress=r.db:6380"],
         lambda o: cluster(o)["gcsFaultToleranceOptions"]["redisAddress"], "r.db:6380"),
    Case("gcsFaultTolerance.redisPasswordSecret", [*GCS, "gcsFaultTolerance.redisPasswordSecret=auth"],
         lambda o: cluster(o)["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]["name"], "auth"),
    Case("gcsFaultTolerance.redisPasswordKey", [*GCS, "gcsFaultTolerance.redisPasswordSecret=auth",
                                                "gcsFaultTolerance.redisPasswordKey=pw"],
         lambda o: cluster(o)["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]["key"], "pw"),
    Case("gcsFaultTolerance.externalStorageNamespace", [*GCS, "gcsFaultTolerance.externalStorageNamespace=moe"],
         lambda o: cluster(o)["gcsFaultToleranceOptions"]["externalStorageNamespace"], "moe"),
    # Services
    Case("service.http.enabled", ["service.http.enabled=false"], service("-http"), None),
    Case("service.http.type", ["service.http.type=LoadBalancer"], lambda o: service("-http")(o)["spec"]["type"],
         "LoadBalancer"),
    Case("service.http.port", ["service.http.port=80"], lambda o: service("-http")(o)["spec"]["ports"][0]["port"], 80),
    Case("service.http.annotations", ["service.http.annotations.owner=ml"],
         lambda o: service("-http")(o)["metadata"]["annotations"], {"owner": "ml"}),
    Case("service.grpc.enabled", ["service.grpc.enabled=false"], service("-grpc"), None),
    Case("service.grpc.type", ["service.grpc.type=NodePort"], lambda o: service("-grpc")(o)["spec"]["type"], "NodePort"),
    Case("service.grpc.port", ["service.grpc.port=443"], lambda o: service("-grpc")(o)["spec"]["ports"][0]["port"], 443),
    Case("service.grpc.annotations", ["service.grpc.annotations.owner=ml"],
         lambda o: service("-grpc")(o)["metadata"]["annotations"], {"owner": "ml"}),
    # NetworkPolicy
    Case("networkPolicy.enabled", ["networkPolicy.enabled=false"], lambda o: kind(o, "NetworkPolicy"), None),
    Case("networkPolicy.kuberayOperator", ["networkPolicy.kuberayOperator=null"],
         lambda o: [r["ports"] for r in kind(o, "NetworkPolicy")["spec"]["ingress"] if "from" in r and "ports" in r],
         []),
    Case("networkPolicy.extraIngress", [], lambda o: kind(o, "NetworkPolicy")["spec"]["ingress"][-1],
         {"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 8265}]},
         set_jsons=['networkPolicy.extraIngress=[{"from":[{"ipBlock":{"cidr":"10.0.0.0/8"}}],"ports":[{"port":8265}]}]']),
    # monitoring
    Case("serviceMonitor.enabled", ["serviceMonitor.enabled=true"],
         lambda o: kind(o, "ServiceMonitor")["metadata"]["name"], f"{RELEASE}-moecluster"),
    Case("serviceMonitor.interval", ["serviceMonitor.enabled=true", "serviceMonitor.interval=10s"],
         lambda o: kind(o, "ServiceMonitor")["spec"]["endpoints"][0]["interval"], "10s"),
    Case("grafanaDashboard.enabled", ["grafanaDashboard.enabled=true"],
         lambda o: kind(o, "ConfigMap")["metadata"]["name"], f"{RELEASE}-moecluster-dashboard"),
    Case("grafanaDashboard.labels", ["grafanaDashboard.enabled=true", "grafanaDashboard.labels.team=ml"],
         lambda o: kind(o, "ConfigMap")["metadata"]["labels"]["team"], "ml"),
    Case("serviceMonitor.labels", ["serviceMonitor.enabled=true", "serviceMonitor.labels.release=prom"],
         lambda o: kind(o, "ServiceMonitor")["metadata"]["labels"]["release"], "prom"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.key}={(c.sets + c.set_strings + c.set_jsons)[-1]}" for c in CASES])
def test_value_lands(case, render):
    objects = render(sets=case.sets, set_strings=case.set_strings, set_jsons=case.set_jsons)
    assert case.get(objects) == case.expected


def test_every_value_has_a_case(generator):
    documented = {key for key, _ in generator.documented_values(generator.VALUES.read_text())}
    covered = {case.key for case in CASES}
    assert documented - covered == set()
