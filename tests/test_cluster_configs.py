"""Every YAML in cluster/ and jobs/ parses and has the fields its tool requires.

Launcher configs are checked by Ray's own cluster-launcher code (defaults filled in, then validated against
``ray/autoscaler/ray-schema.json``); KubeRay manifests against the fields the ray.io/v1 CRDs mark required
(``ray-project/kuberay: ray-operator/apis/ray/v1/raycluster_types.go`` / ``rayjob_types.go``: json tags without
``omitempty``); the runtime env against Ray's ``RuntimeEnv``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = sorted((ROOT / "cluster").glob("*/hdebm-*.yaml"))
KUBERAY = sorted((ROOT / "cluster" / "kuberay").glob("ray*.yaml"))


def test_every_yaml_parses():
    files = sorted((ROOT / "cluster").rglob("*.yaml")) + sorted((ROOT / "jobs").rglob("*.yaml"))
    assert len(files) >= 6
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            assert isinstance(doc, dict), f


def validate_launcher(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.parent.name)
def test_cluster_launcher_configs_pass_rays_validation(path):
    config = yaml.safe_load(path.read_text())
    validate_launcher(config)
    assert config["provider"]["type"] == path.parent.name
    workers = [v for k, v in config["available_node_types"].items() if k != config["head_node_type"]]
    assert workers and all(w["max_workers"] >= w.get("min_workers", 0) for w in workers)
    assert any("pip install" in c for c in config["setup_commands"])
    # the validator is not vacuous: a node type without node_config is refused
    broken = copy.deepcopy(config)
    del broken["available_node_types"][config["head_node_type"]]["node_config"]
    with pytest.raises(jsonschema.ValidationError):
        validate_launcher(broken)


def missing_keys(obj: dict, required: list[str], where: str) -> list[str]:
    return [f"{where}.{k}" for k in required if k not in obj]


def pod_template_problems(template: dict, where: str) -> list[str]:
    containers = template.get("spec", {}).get("containers", [])
    if not containers:
        return [f"{where}.spec.containers"]
    out = []
    for i, c in enumerate(containers):
        out += missing_keys(c, ["name", "image"], f"{where}.spec.containers[{i}]")
    mounts = {m["mountPath"] for c in containers for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    for c in containers:
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                out.append(f"{where}: volumeMount {m['name']!r} has no volume")
    if "/dev/shm" not in mounts:
        out.append(f"{where}: no /dev/shm volume for the object store")
    return out


def raycluster_spec_problems(spec: dict, where: str) -> list[str]:
    out = missing_keys(spec, ["headGroupSpec"], where)
    head = spec.get("headGroupSpec", {})
    out += missing_keys(head, ["rayStartParams", "template"], f"{where}.headGroupSpec")
    out += pod_template_problems(head.get("template", {}), f"{where}.headGroupSpec.template")
    for i, group in enumerate(spec.get("workerGroupSpecs", [])):
        w = f"{where}.workerGroupSpecs[{i}]"
        out += missing_keys(group, ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"], w)
        out += pod_template_problems(group.get("template", {}), f"{w}.template")
        if not group.get("minReplicas", 0) <= group.get("replicas", 0) <= group.get("maxReplicas", 0):
            out.append(f"{w}: replicas outside [minReplicas, maxReplicas]")
    return out


def kuberay_problems(doc: dict) -> list[str]:
    out = missing_keys(doc, ["apiVersion", "kind", "metadata", "spec"], doc.get("kind", "?"))
    if doc.get("apiVersion") != "ray.io/v1":
        out.append(f"apiVersion {doc.get('apiVersion')!r} is not ray.io/v1")
    if "name" not in doc.get("metadata", {}):
        out.append("metadata.name")
    spec = doc.get("spec", {})
    if doc.get("kind") == "RayCluster":
        out += raycluster_spec_problems(spec, "spec")
    elif doc.get("kind") == "RayJob":
        out += missing_keys(spec, ["entrypoint"], "spec")
        if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
            out.append("spec: exactly one of rayClusterSpec / clusterSelector")
        if "rayClusterSpec" in spec:
            out += raycluster_spec_problems(spec["rayClusterSpec"], "spec.rayClusterSpec")
        if "runtimeEnvYAML" in spec:
            assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    else:
        out.append(f"unexpected kind {doc.get('kind')!r}")
    return out


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifests_have_the_crd_required_fields(path):
    doc = yaml.safe_load(path.read_text())
    assert kuberay_problems(doc) == []
    if doc["kind"] == "RayJob":
        assert "python -m hdebm_ray" in doc["spec"]["entrypoint"]
    # the checker is not vacuous
    broken = copy.deepcopy(doc)
    spec = broken["spec"].get("rayClusterSpec", broken["spec"])
    del spec["workerGroupSpecs"][0]["groupName"]
    assert kuberay_problems(broken)


def test_kuberay_shares_one_storage_claim():
    claim = yaml.safe_load((ROOT / "cluster" / "kuberay" / "storage.yaml").read_text())
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    for path in KUBERAY:
        text = path.read_text()
        assert f"claimName: {claim['metadata']['name']}" in text, path


def test_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    assert set(env) <= RuntimeEnv.known_fields  # RuntimeEnv would take an unknown key for a plugin
    RuntimeEnv(**env)  # raises on ill-typed fields (e.g. a non-string env var)
    with pytest.raises(TypeError):
        RuntimeEnv(**{**env, "env_vars": {"N": 1}})
    assert env["excludes"][0] == "/*"  # an allow-list: what is uploaded is checked in test_cluster_privileges


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.parent.name)
def test_launcher_clusters_require_the_token_and_keep_the_dashboard_on_loopback(path):
    config = yaml.safe_load(path.read_text())
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    (head,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in path.read_text()
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the same token on every node


def test_kuberay_clusters_require_the_token_and_a_network_policy_confines_their_ports():
    for path in KUBERAY:
        doc = yaml.safe_load(path.read_text())
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["authOptions"] == {"mode": "token", "secretName": "hdebm-ray-auth"}, path
        templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        if doc["kind"] == "RayJob":
            templates.append(doc["spec"]["submitterPodTemplate"])
            env = {e["name"]: e for e in doc["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hdebm-ray-auth"
        assert all(t["metadata"]["labels"]["app"] == "hdebm" for t in templates), path
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"  # reached by port-forward only
    policy = yaml.safe_load((ROOT / "cluster" / "kuberay" / "networkpolicy.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["podSelector"]["matchLabels"] == {"app": "hdebm"}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    same_cluster, operator = policy["spec"]["ingress"]
    assert same_cluster == {"from": [{"podSelector": {"matchLabels": {"app": "hdebm"}}}]}  # all ports, own pods
    assert operator["ports"] == [{"protocol": "TCP", "port": 8265}]  # the operator: the dashboard only


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.parent.name)
def test_launcher_spot_workers_are_labelled_spot_and_the_head_is_not(path):
    """The bank actor and the eval pool are placed off nodes labelled ray.io/market-type=spot (Ray sets the label
    from RAY_NODE_MARKET_TYPE): the preemptible worker group must say so, the head must not."""
    config = yaml.safe_load(path.read_text())
    text = path.read_text()
    assert "MarketType: spot" in text or "preemptible: true" in text
    (worker,) = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    (head,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "RAY_NODE_MARKET_TYPE=spot " in worker and "RAY_NODE_MARKET_TYPE" not in head


def test_kuberay_workers_are_labelled_spot_and_a_rayjob_may_be_resubmitted():
    for path in KUBERAY:
        doc = yaml.safe_load(path.read_text())
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        for group in spec["workerGroupSpecs"]:
            (container,) = group["template"]["spec"]["containers"]
            assert {"name": "RAY_NODE_MARKET_TYPE", "value": "spot"} in container["env"], path
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert all(e["name"] != "RAY_NODE_MARKET_TYPE" for e in head.get("env", [])), path
        if doc["kind"] == "RayJob":
            assert doc["spec"]["backoffLimit"] >= 1  # a lost cluster's job is submitted again and resumes


def test_a_stopped_job_has_time_to_checkpoint():
    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())["env_vars"]
    assert float(env["RAY_JOB_STOP_WAIT_TIME_S"]) >= 300  # SIGTERM, then SIGKILL only after this
    submit = (ROOT / "jobs" / "submit.sh").read_text()
    assert "--submission-id" not in submit.split("SUBMISSION_ID:-}")[0].split("cmd=(")[-1]  # no fixed job id
