"""values.schema.json: its `serve` part is ServeConfig's own schema, the generated files are current, and bad
values fail in helm with the schema's message."""

import json

import pytest
import yaml

from cluster import config
from cluster.config import ServeConfig


def test_serve_schema_is_generated_from_serveconfig(generator):
    committed = generator.SCHEMA.read_text()
    assert committed == generator.render_schema(json.loads(committed)), (
        "values.schema.json's `serve` differs from ServeConfig.model_json_schema(): "
        "run python helm/moecluster/hack/generate.py")
    serve = json.loads(committed)["properties"]["serve"]
    assert set(serve["properties"]) == set(ServeConfig.model_fields)
    assert serve["additionalProperties"] is False


def test_the_fields_file_is_generated_from_cluster_config(generator):
    """files/fields.json, which the templates split `serve` by, names cluster/config.py's field groups."""
    committed = generator.FIELDS.read_text()
    assert committed == generator.render_fields(), (
        "helm/moecluster/files/fields.json differs from cluster/config.py: run python helm/moecluster/hack/generate.py")
    fields = json.loads(committed)
    assert (set(fields["live"]), set(fields["scaling"]), set(fields["worker_limits"])) == (
        config.LIVE_FIELDS, config.SCALING_FIELDS, config.WORKER_LIMITS)


def test_every_generated_file_is_current(generator, capsys):
    assert generator.main(["--check"]) == 0, capsys.readouterr().err
    assert set(generator.outputs()) == {generator.SCHEMA, generator.FIELDS, generator.README}


def test_the_check_catches_a_stale_fields_file(generator, monkeypatch, tmp_path, capsys):
    # cluster/config.py moves a field (here: routing is no longer live) and nobody regenerates
    monkeypatch.setattr(config, "LIVE_FIELDS", config.LIVE_FIELDS - {"routing"})
    assert generator.main(["--check"]) == 1
    assert "stale: helm/moecluster/files/fields.json" in capsys.readouterr().err
    monkeypatch.undo()
    # the file is edited by hand, or missing
    edited = tmp_path / "fields.json"
    edited.write_text(generator.FIELDS.read_text().replace('"routing",', ""))
    monkeypatch.setattr(generator, "FIELDS", edited)
    assert generator.main(["--check"]) == 1
    assert f"stale: {edited}" in capsys.readouterr().err
    edited.unlink()
    assert generator.main(["--check"]) == 1


def test_readme_tables_are_current(generator):
    assert generator.README.read_text() == generator.render_readme(generator.README.read_text()), (
        "helm/moecluster/README.md's generated tables are stale: run python helm/moecluster/hack/generate.py")


def test_every_value_carries_a_doc_comment(generator):
    documented = generator.documented_values(generator.VALUES.read_text())  # raises naming any undocumented value
    assert all(description for _, description in documented)


def test_serve_defaults_are_serveconfig_defaults(generator):
    """values.yaml lists ServeConfig fields with ServeConfig's own defaults: the chart changes nothing by default."""
    serve = yaml.safe_load(generator.VALUES.read_text())["serve"]
    defaults = ServeConfig().model_dump()

    def check(values: dict, expected: dict, prefix: str):
        for key, value in values.items():
            assert key in expected, f"serve.{prefix}{key} is not a ServeConfig field"
            if isinstance(value, dict) and value:
                check(value, expected[key], f"{prefix}{key}.")
            else:
                assert value == expected[key], f"serve.{prefix}{key}: {value!r} in values.yaml, ServeConfig says " \
                                               f"{expected[key]!r}"

    check(serve, defaults, "")


def test_the_values_files_validate_as_json_schema(generator, chart):
    import jsonschema

    schema = json.loads(generator.SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load(generator.VALUES.read_text())
    jsonschema.validate(defaults, schema)
    ci = yaml.safe_load(chart.CI_VALUES.read_text())
    merged = {**defaults, **ci, "expertGroups": {k: v for k, v in ci["expertGroups"].items() if v is not None}}
    jsonschema.validate(merged, schema)


# Bad values, and what helm says about them: the path of the value and the schema's reason.
BAD = {
    "string replica count": (
        {"set_strings": ["expertGroups.experts.replicas=3"]},
        ["at '/expertGroups/experts/replicas'", "got string, want integer"]),
    "string expert replica count in serve": (
        {"set_strings": ["serve.expert_replicas.3:7=2"]},
        ["at '/serve/expert_replicas/3:7'", "got string, want integer"]),
    "expert replica key that is not layer:expert": (
        {"sets": ["serve.expert_replicas.seven=2"]},
        ["at '/serve/expert_replicas'", "additional properties 'seven' not allowed"]),
    "expert replica count below one": (
        {"sets": ["serve.expert_replicas.3:7=0"]},
        ["at '/serve/expert_replicas/3:7'", "minimum: got 0, want 1"]),
    "negative GPU count": (
        {"sets": ["expertGroups.experts.gpus=-1"]},
        ["at '/expertGroups/experts/gpus'", "minimum: got -1, want 0"]),
    "unknown top-level key": (
        {"sets": ["replicas=3"]},
        ["at ''", "additional properties 'replicas' not allowed"]),
    "unknown key in an expert group": (
        {"sets": ["expertGroups.experts.gpu=1"]},
        ["at '/expertGroups/experts'", "additional properties 'gpu' not allowed"]),
    "unknown ServeConfig field": (
        {"sets": ["serve.num_worker=4"]},
        ["at '/serve'", "additional properties 'num_worker' not allowed"]),
    "fraction given with --set (a string to helm)": (
        {"sets": ["serve.worker_gpus=0.5"]},
        ["at '/serve/worker_gpus'", "got string, want number"]),
    "ServeConfig range": (
        {"sets": ["serve.num_workers=0"]},
        ["at '/serve/num_workers'", "minimum: got 0, want 1"]),
    "ServeConfig enum": (
        {"sets": ["serve.routing.policy=random"]},
        ["at '/serve/routing/policy'", "value must be one of 'model', 'hash', 'balanced', 'kmeans'"]),
    "unquoted ray start param": (
        {"sets": ["head.rayStartParams.num-cpus=1"]},
        ["at '/head/rayStartParams/num-cpus'", "got number, want string"]),
    "group name that is not a DNS label": (
        {"sets": ["expertGroups.H100_big.replicas=1", "expertGroups.H100_big.minReplicas=1",
                  "expertGroups.H100_big.maxReplicas=1"]},
        ["invalid propertyName 'H100_big'", "'H100_big' does not match pattern"]),
    "group without replicas": (
        {"sets": ["expertGroups.l4.gpus=1"]},
        ["at '/expertGroups/l4'", "missing properties 'replicas', 'minReplicas', 'maxReplicas'"]),
    "unknown placement": (
        {"sets": ["serve.placement=diagonal"]},
        ["at '/serve/placement'", "value must be one of 'auto', 'spread', 'by_layer'"]),
    "stream interval below one": (
        {"sets": ["serve.stream_interval=0"]},
        ["at '/serve/stream_interval'", "minimum: got 0, want 1"]),
    "unknown storage type": (
        {"sets": ["modelStorage.type=s3"]},
        ["at '/modelStorage/type'", "value must be one of 'embedded', 'demo', 'pvc', 'hostPath', 'download'"]),
    "ray token Secret name that is not a DNS name": (
        {"sets": ["rayAuth.tokenSecret.name=Ray_Token"]},
        ["at '/rayAuth/tokenSecret/name'", "does not match pattern"]),
    "scratch size that is not a quantity": (
        {"sets": ["scratch.tmp.sizeLimit=lots"]},
        ["at '/scratch/tmp/sizeLimit'"]),
    "unknown key in networkPolicy": (
        {"sets": ["networkPolicy.allowAll=true"]},
        ["at '/networkPolicy'", "additional properties 'allowAll' not allowed"]),
    "unknown key in the serving group": (
        {"sets": ["servingGroup.numGpus=1"]},
        ["at '/servingGroup'", "additional properties 'numGpus' not allowed"]),
    "serving group with no room per pod": (
        {"sets": ["servingGroup.replicasPerPod=0"]},
        ["at '/servingGroup/replicasPerPod'", "minimum: got 0, want 1"]),
    "num_replicas with autoscaling": (
        {"sets": ["serve.num_replicas=3", "serve.autoscaling.max_replicas=4"]},
        ["at '/serve/num_replicas'", "maximum: got 3, want 1"]),
    "unknown autoscaling key": (
        {"sets": ["serve.autoscaling.max=4"]},
        ["at '/serve/autoscaling'", "additional properties 'max' not allowed"]),
    "download without a repository": (
        {"sets": ["modelStorage.type=download"]},
        ["at '/modelStorage/download/repoId'", "does not match pattern"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_values_fail_with_the_schema_message(case, render, lint, chart):
    values, messages = BAD[case]
    for command in (render, lint):
        with pytest.raises(chart.HelmError) as error:
            command(**values)
        text = str(error.value)
        for message in messages:
            assert message in text, text
