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


def test_kustomization_lists_every_manifest_but_the_secret_templates():
    kustomization = yaml.safe_load((REPO / "k8s" / "kustomization.yaml").read_text())
    files = {p.name for p in (REPO / "k8s").glob("*.yaml")
             if p.name != "kustomization.yaml" and not p.name.endswith(".example.yaml")}
    assert set(kustomization["resources"]) == files
    kinds = {d["kind"] for _, d in _documents()}
    assert {"RayCluster", "RayJob", "RayCronJob", "ServiceAccount", "Role", "RoleBinding", "Secret",
            "NetworkPolicy"} <= kinds


def _ray_cluster_specs():
    for _, doc in _documents():
        if doc["kind"] == "RayCluster":
            yield doc["kind"], doc["spec"]
        elif doc["kind"] == "RayJob":
            yield doc["kind"], doc["spec"]["rayClusterSpec"]
        elif doc["kind"] == "RayCronJob":
            yield doc["kind"], doc["spec"]["jobTemplate"]["rayClusterSpec"]


def test_every_ray_cluster_runs_with_token_auth_from_the_token_secret():
    specs = list(_ray_cluster_specs())
    assert {kind for kind, _ in specs} == {"RayCluster", "RayJob", "RayCronJob"}
    for kind, spec in specs:
        assert spec["authOptions"] == {"mode": "token", "secretName": "scalekd-ray-token"}, kind
    template = next(d for _, d in _documents()
                    if d["kind"] == "Secret" and d["metadata"]["name"] == "scalekd-ray-token")
    assert set(template["stringData"]) == {"auth_token"}  # the key KubeRay reads


def test_jobs_use_deletion_rules_deadlines_and_retries_and_the_cron_job_is_marked_alpha():
    docs = {d["kind"]: d for _, d in _documents()}
    for job in (docs["RayJob"]["spec"], docs["RayCronJob"]["spec"]["jobTemplate"]):
        assert job["activeDeadlineSeconds"] > 0 and job["backoffLimit"] >= 1
        assert job["deletionStrategy"]["deletionRules"]
        assert not {"onSuccess", "onFailure"} & set(job["deletionStrategy"])  # the deprecated policies
        assert "shutdownAfterJobFinishes" not in job and "ttlSecondsAfterFinished" not in job
    assert docs["RayCronJob"]["metadata"]["annotations"]["scalekd.io/stability"] == "alpha"
    assert "feature gate" in (REPO / "k8s" / "raycronjob-retrain.yaml").read_text().lower()


def test_network_policy_admits_only_the_pipeline_to_the_jobs_api_and_the_cluster_to_the_rest():
    policy = next(d for _, d in _documents() if d["kind"] == "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"ray.io/cluster": "scalekd-ray"}
    own, clients = policy["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": {"ray.io/cluster": "scalekd-ray"}}}]}
    assert clients["ports"] == [{"protocol": "TCP", "port": 8265}]
    assert clients["from"] == [{"podSelector": {"matchLabels": {"scalekd.io/ray-client": "true"}}}]
    compiled = (REPO / "pipelines" / "compiled" / "training.yaml").read_text()
    assert "scalekd.io/ray-client" in compiled and "scalekd-ray-token" in compiled and "RAY_AUTH_TOKEN" in compiled


def test_gpu_worker_group_and_secret_placeholders():
    docs = dict((d["kind"], d) for _, d in _documents())
    worker = docs["RayCluster"]["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for secret in (d for _, d in _documents() if d["kind"] == "Secret"):
        assert all(v.startswith("<") or k == "AWS_DEFAULT_REGION" for k, v in secret["stringData"].items())
