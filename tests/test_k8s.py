"""Every manifest in k8s/ validates: core kinds with kubernetes-validate, KubeRay kinds against the
CRD schemas (copied into tests/data/k8s-schemas from KubeRay, see its README)."""

from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = Path(__file__).resolve().parent / "data" / "k8s-schemas"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
        "RayCronJob": "ray.io_raycronjobs.yaml"}
K8S_VERSION = "1.31.0"


def _documents():
    for path in sorted((REPO / "k8s").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


def _crd_schema(kind: str, version: str) -> dict:
    crd = yaml.safe_load((SCHEMAS / CRDS[kind]).read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise AssertionError(f"{kind} has no CRD version {version}")


@pytest.mark.parametrize("name, doc", list(_documents()), ids=lambda x: x if isinstance(x, str) else x.get("kind"))
def test_manifest_validates(name, doc):
    kind = doc["kind"]
    if kind in CRDS:
        group, version = doc["apiVersion"].split("/")
        assert group == "ray.io"
        jsonschema.validate(doc, _crd_schema(kind, version))
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_crd_validation_catches_a_broken_manifest():
    doc = next(d for _, d in _documents() if d["kind"] == "RayCronJob")
    broken = {**doc, "spec": {k: v for k, v in doc["spec"].items() if k != "schedule"}}
    with pytest.raises(jsonschema.ValidationError, match="schedule"):
        jsonschema.validate(broken, _crd_schema("RayCronJob", "v1"))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": 3}},
                                     K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_secret_template():
    kustomization = yaml.safe_load((REPO / "k8s" / "kustomization.yaml").read_text())
    files = {p.name for p in (REPO / "k8s").glob("*.yaml")} - {"kustomization.yaml", "secret-s3.example.yaml"}
    assert set(kustomization["resources"]) == files
    kinds = {d["kind"] for _, d in _documents()}
    assert {"RayCluster", "RayJob", "RayCronJob", "ServiceAccount", "Role", "RoleBinding", "Secret"} <= kinds


def test_gpu_worker_group_and_secret_placeholders():
    docs = dict((d["kind"], d) for _, d in _documents())
    worker = docs["RayCluster"]["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert all(v.startswith("<") or k == "AWS_DEFAULT_REGION" for k, v in docs["Secret"]["stringData"].items())
