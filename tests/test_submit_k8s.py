"""`mixer submit` for Kubernetes: rendered Kubeflow PyTorchJob manifests checked against the PyTorchJob schema
(the Kubeflow training SDK's models, generated from the operator's OpenAPI spec, down to the Kubernetes pod
models), plus the DeepSpeed hostfile beside them."""

import copy
import re

import kubeflow.training.models as kubeflow_models
import kubernetes.client.models as k8s_models
import pytest
import yaml

from tests.conftest import REPO, run_mixer

TINY = REPO / "tests" / "configs" / "tiny.yaml"
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def validate(value, type_name: str, path: str = "$"):
    """Check `value` against an OpenAPI model type, strictly: unknown keys, wrong types and missing required
    fields are errors (the models' constructors refuse required fields left out). Returns the model object."""
    if type_name.startswith("list["):
        assert isinstance(value, list), f"{path}: expected a list"
        return [validate(v, type_name[5:-1], f"{path}[{i}]") for i, v in enumerate(value)]
    if type_name.startswith("dict("):
        assert isinstance(value, dict), f"{path}: expected a mapping"
        inner = re.match(r"dict\(str, (.+)\)", type_name).group(1)
        return {k: validate(v, inner, f"{path}.{k}") for k, v in value.items()}
    if type_name in PRIMITIVES:
        assert isinstance(value, PRIMITIVES[type_name]) and not (type_name == "int" and isinstance(value, bool)), (
            f"{path}: expected {type_name}, got {value!r}"
        )
        return value
    model = getattr(kubeflow_models, type_name, None) or getattr(k8s_models, type_name)
    assert isinstance(value, dict), f"{path}: expected a {type_name} mapping"
    by_json = {json_key: attr for attr, json_key in model.attribute_map.items()}
    unknown = sorted(set(value) - set(by_json))
    assert not unknown, f"{path}: {type_name} has no field(s) {unknown}"
    kwargs = {by_json[k]: validate(v, model.openapi_types[by_json[k]], f"{path}.{k}") for k, v in value.items()}
    try:
        return model(**kwargs)
    except ValueError as err:
        raise AssertionError(f"{path}: {err}") from err


def test_the_validator_catches_what_the_schema_forbids():
    good = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "x"},
            "spec": {"runPolicy": {}, "pytorchReplicaSpecs": {"Master": {"replicas": 1, "template": {"spec": {
                "containers": [{"name": "pytorch", "image": "i"}]}}}}}}  # fmt: skip
    validate(good, "KubeflowOrgV1PyTorchJob")
    with pytest.raises(AssertionError, match="no field"):
        validate({**good, "spek": {}}, "KubeflowOrgV1PyTorchJob")
    no_name = copy.deepcopy(good)
    del no_name["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(AssertionError, match="name"):
        validate(no_name, "KubeflowOrgV1PyTorchJob")
    with pytest.raises(AssertionError, match="expected int"):
        validate({**good, "spec": {"runPolicy": {}, "pytorchReplicaSpecs": {"Master": {"replicas": "1"}}}},
                 "KubeflowOrgV1PyTorchJob")  # fmt: skip


def test_k8s_manifests_validate_and_chain_the_stages(tmp_path):
    shared = tmp_path / "shared"
    overrides = [
        f"output_dir={shared}/runs/tiny",
        f"datasets.shapes.path={shared}/data/shapes",
        f"datasets.novel.path={shared}/data/novel",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "cluster.image=registry.example.com/mixer:1.0",
        "cluster.nodes=3",
        "cluster.gpus_per_node=8",
        "cluster.cpus_per_node=96",
        f"cluster.volumes={{team-pvc: {shared}}}",
        "cluster.env={NCCL_DEBUG: WARN}",
        "cluster.stages={eval: {nodes: 1}}",
        "launch.nproc_per_node=8",
    ]
    result = run_mixer("submit", str(TINY), "--to", "print", *overrides)
    assert result.returncode == 0, result.stderr
    jobs = shared / "runs" / "tiny" / "jobs"
    stage_names = ("pretrain", "finetune", "eval")
    manifests = {s: yaml.safe_load((jobs / f"{s}.pytorchjob.yaml").read_text()) for s in stage_names}
    for manifest in manifests.values():
        validate(manifest, "KubeflowOrgV1PyTorchJob")
        assert manifest["apiVersion"] == "kubeflow.org/v1" and manifest["kind"] == "PyTorchJob"
    pretrain = manifests["pretrain"]["spec"]
    assert pretrain["nprocPerNode"] == "8" and pretrain["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    pod = pretrain["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "pytorch" and container["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert container["command"][container["command"].index("stage") + 1] == f"{shared}/runs/tiny/config.yaml"
    assert {"name": "NCCL_DEBUG", "value": "WARN"} in container["env"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "team-pvc"}
    # the chain: each stage's pods wait for the result of the stage before it
    waits = {s: m["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["initContainers"][0]["command"][-1]
             for s, m in manifests.items()}  # fmt: skip
    assert waits == {"pretrain": "", "finetune": f"{shared}/runs/tiny/stages/pretrain/result.json",
                     "eval": f"{shared}/runs/tiny/stages/finetune/result.json"}  # fmt: skip
    assert (
        "--last"
        in manifests["eval"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
        and "Worker" not in manifests["eval"]["spec"]["pytorchReplicaSpecs"]
    )
    hostfile = (jobs / "pretrain.hostfile").read_text().splitlines()
    assert hostfile == [f"tiny-pretrain-{pod} slots=8" for pod in ("master-0", "worker-0", "worker-1")]


def test_k8s_submission_names_what_is_missing(tmp_path):
    overrides = [f"output_dir={tmp_path}/runs/tiny", f"datasets.shapes.path={tmp_path}/d/s",
                 f"datasets.novel.path={tmp_path}/d/n", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]  # fmt: skip
    no_image = run_mixer("submit", str(TINY), "--to", "k8s", *overrides)
    assert no_image.returncode == 1 and "'cluster.image' is required" in no_image.stderr
    off_volume = run_mixer(
        "submit", str(TINY), "--to", "k8s", *overrides, "cluster.image=i", "cluster.volumes={pvc: /mnt/x}"
    )
    assert off_volume.returncode == 1 and "on none of cluster.volumes' mount paths" in off_volume.stderr
