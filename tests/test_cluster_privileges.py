"""What we ship into a user's cloud account gives away no more than it needs, and every node runs the head's code.

The launcher configs are read by Ray's own AWS / GCP bootstrap functions where those decide what gets created
(security groups, external IPs); the set-up scripts run for real against a fake `aws` / `gcloud` that records each
call; the job upload is zipped by Ray's own packaging code and the image context filtered with Docker's
.dockerignore rules, both over a copy of this checkout with secrets planted in it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from test_cluster_configs import KUBERAY, validate_launcher

ROOT = Path(__file__).resolve().parents[1]
SECRETS = [".env", "deploy.pem", "kubeconfig", "credentials.json", "hdebm_ray/.env", "hdebm_ray/id_rsa.pem"]
SECRETS += ["runs/a/checkpoint.pt", "data/train.parquet", "notes.txt", ".git/config"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
ENV = {
    "REGION": "eu-west-1",
    "BUCKET": "lab-runs",
    "PREFIX": "team-hdebm",
    "SSH_CIDR": "198.51.100.7/32",
    "COMMIT": COMMIT,
}
FAKE = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
args = " ".join(sys.argv[1:])
if "get-caller-identity" in args:
    print("210987654321")
elif "create-security-group" in args:
    print("sg-" + sys.argv[sys.argv.index("--group-name") + 1])
"""


CLOUD_SDKS = (
    "boto3",
    "botocore",
    "googleapiclient",
    "google.oauth2",
    "google.auth",
    "google_auth_httplib2",
    "httplib2",
)


def is_cloud_sdk(name: str) -> bool:
    return any(name == sdk or name.startswith(sdk + ".") for sdk in CLOUD_SDKS)


class _CloudCall:
    """Anything reached through a stubbed cloud SDK: using it fails the test (there are no credentials here)."""

    def __init__(self, what: str):
        self.what = what

    def __call__(self, *args, **kwargs):
        raise AssertionError(f"a cloud API was used: {self.what}")

    def __getattr__(self, name: str):
        return _CloudCall(f"{self.what}.{name}")

    def __mro_entries__(self, bases):
        return (object,)


class _CloudSdk(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if is_cloud_sdk(name) else None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []  # a package: its submodules import through this finder too
        module.__version__ = "99.0"  # Ray's module-level minimum-version checks
        module.__getattr__ = lambda attr: _CloudCall(f"{spec.name}.{attr}")
        return module

    def exec_module(self, module):
        pass


@pytest.fixture
def launcher(monkeypatch):
    """Ray's AWS and GCP bootstrap modules, imported over cloud SDKs that fail on any use (they are not installed
    here; a bootstrap step that returns without touching them provably made no cloud call)."""
    before = set(sys.modules)
    launchers = ("ray.autoscaler._private.aws", "ray.autoscaler._private.gcp")

    def ours(m: str) -> bool:
        return is_cloud_sdk(m) or m.startswith(launchers)

    for name in [m for m in sys.modules if ours(m)]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_CloudSdk(), *sys.meta_path])
    from ray.autoscaler._private.aws import config as aws
    from ray.autoscaler._private.gcp import config as gcp

    yield aws, gcp
    for name in [m for m in sys.modules if m not in before and ours(m)]:
        del sys.modules[name]


def run_setup(provider: str, tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, list[list[str]], Path]:
    """cluster/<provider>/setup.sh, run from a copy of cluster/<provider> with a fake cloud CLI on PATH."""
    here = tmp_path / provider
    shutil.copytree(ROOT / "cluster" / provider, here, dirs_exist_ok=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for cli in ("aws", "gcloud"):
        (bin_dir / cli).write_text(FAKE)
        (bin_dir / cli).chmod(0o755)
    log = tmp_path / f"{provider}.log"
    log.unlink(missing_ok=True)
    full = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "HOME": str(tmp_path), **env}
    done = subprocess.run([str(here / "setup.sh")], env=full, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return done, calls, here / "hdebm-gpu.mine.yaml"


def flag(call: list[str], name: str) -> str:
    return call[call.index(name) + 1]


def render(path: Path, **values) -> dict:
    text = path.read_text()
    for key, value in values.items():
        text = text.replace("${" + key + "}", value)
    assert "${" not in text, path
    return json.loads(text)


# -- AWS


def test_aws_nodes_bring_their_own_groups_workers_have_no_public_ip_and_head_and_workers_separate_profiles(launcher):
    aws, _ = launcher
    config = yaml.safe_load((ROOT / "cluster" / "aws" / "hdebm-gpu.yaml").read_text())
    types = config["available_node_types"]
    head, (worker,) = types[config["head_node_type"]], [v for k, v in types.items() if k != config["head_node_type"]]
    assert head["node_config"]["SecurityGroupIds"] == ["HDEBM_NODES_SG", "HDEBM_HEAD_SSH_SG"]
    (nic,) = worker["node_config"]["NetworkInterfaces"]
    assert nic["AssociatePublicIpAddress"] is False and nic["Groups"] == ["HDEBM_NODES_SG"]  # no SSH group
    for key, node_type in types.items():  # Ray's own bootstrap moves the interfaces' groups into the node config
        types[key] = aws._configure_node_type_from_network_interface(node_type)
    # ... so its security-group step has nothing to create: it returns before any AWS call (there are no
    # credentials here: a call would fail), and the default group that admits SSH from anywhere never exists
    assert aws._configure_security_group(config) is config
    profiles = {k: t["node_config"]["IamInstanceProfile"]["Arn"] for k, t in types.items()}
    assert profiles[config["head_node_type"]].endswith("/hdebm-head") and len(set(profiles.values())) == 2
    assert all(p.endswith(("/hdebm-head", "/hdebm-worker")) for p in profiles.values())


def test_aws_policies_give_workers_the_runs_prefix_and_the_head_only_the_autoscalers_rights_on_top():
    values = {"BUCKET": "b", "PREFIX": "p", "REGION": "r", "ACCOUNT_ID": "1", "CLUSTER": "c"}
    worker = render(ROOT / "cluster" / "aws" / "iam" / "worker-policy.json", **values)
    head = render(ROOT / "cluster" / "aws" / "iam" / "head-policy.json", **values)

    def statements(policy):
        for s in policy["Statement"]:
            actions = [s["Action"]] if isinstance(s["Action"], str) else s["Action"]
            resources = [s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"]
            assert s["Effect"] == "Allow" and all("*" not in a for a in actions), s  # no wildcard actions
            yield s, actions, resources

    for _, actions, resources in statements(worker):
        assert all(a.startswith("s3:") for a in actions)
        if resources == ["arn:aws:s3:::b"]:  # the bucket itself: its object names (HeadBucket needs it unconditioned)
            assert actions == ["s3:ListBucket"]
        else:
            assert resources == ["arn:aws:s3:::b/p/*"]
    s3 = [s for s, actions, _ in statements(head) if actions[0].startswith("s3:")]
    assert s3 == worker["Statement"]  # the head's bucket rights are the workers', no more
    by_sid = {s["Sid"]: (s, actions, resources) for s, actions, resources in statements(head)}
    s, actions, resources = by_sid["AutoscalerGivesWorkersTheirRoleOnly"]
    assert actions == ["iam:PassRole"] and resources == ["arn:aws:iam::1:role/c-worker"]
    s, actions, resources = by_sid["AutoscalerManagesThisClustersNodesOnly"]
    assert "ec2:TerminateInstances" in actions and s["Condition"]["StringEquals"] == {
        "ec2:ResourceTag/ray-cluster-name": "c"  # Ray tags every node it launches with its cluster name
    }
    # beyond the runs prefix, what is granted without a condition: reads, and launching (RunInstances touches images,
    # subnets, groups and volumes that carry no tag to condition on)
    unconditioned = {a for s, acts, _ in statements(head) if "Condition" not in s for a in acts if a[:3] != "s3:"}
    assert unconditioned - {"ec2:RunInstances", "iam:GetInstanceProfile"} <= {
        "ec2:DescribeInstances",
        "ec2:DescribeInstanceTypes",
        "ec2:DescribeImages",
        "ec2:DescribeSubnets",
        "ec2:DescribeSecurityGroups",
    }


def test_aws_setup_opens_ssh_to_the_users_range_only_and_writes_a_config_rays_launcher_accepts(tmp_path):
    env = {**ENV, "VPC_ID": "vpc-1", "HEAD_SUBNET": "subnet-pub", "WORKER_SUBNET": "subnet-priv"}
    done, calls, mine = run_setup("aws", tmp_path, **env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0.0.0.0/0" not in json.dumps(calls)
    ingress = [c for c in calls if "authorize-security-group-ingress" in c]
    assert len(ingress) == 2
    assert flag(ingress[0], "--ip-permissions") == "IpProtocol=-1,UserIdGroupPairs=[{GroupId=sg-hdebm-nodes}]"
    assert flag(ingress[1], "--group-id") == "sg-hdebm-head-ssh" and flag(ingress[1], "--cidr") == ENV["SSH_CIDR"]
    assert flag(ingress[1], "--port") == "22"
    policies = {
        flag(c, "--role-name"): json.loads(flag(c, "--policy-document")) for c in calls if "put-role-policy" in c
    }
    assert set(policies) == {"hdebm-head", "hdebm-worker"}
    worker_resources = {r for s in policies["hdebm-worker"]["Statement"] for r in [s["Resource"]]}
    assert worker_resources == {"arn:aws:s3:::lab-runs", "arn:aws:s3:::lab-runs/team-hdebm/*"}
    (subnet,) = [c for c in calls if "modify-subnet-attribute" in c]  # what Ray's launcher insists on ...
    assert flag(subnet, "--subnet-id") == "subnet-priv"  # ... on the workers' subnet, their interface says no IP
    config = yaml.safe_load(mine.read_text())
    validate_launcher(config)
    assert not re.search(r"HDEBM_(NODES|HEAD|WORKER)|123456789012", mine.read_text())
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    assert head["SecurityGroupIds"] == ["sg-hdebm-nodes", "sg-hdebm-head-ssh"] and head["SubnetIds"] == ["subnet-pub"]
    assert head["IamInstanceProfile"]["Arn"] == "arn:aws:iam::210987654321:instance-profile/hdebm-head"
    assert config["provider"]["region"] == "eu-west-1"
    (install,) = [c for c in config["setup_commands"] if "pip install" in c]
    assert install.endswith(f'.git@{COMMIT}"')  # every node installs the commit set up, never a branch
    bad_inputs = [
        ({"SSH_CIDR": "0.0.0.0/0"}, "opens SSH to the internet"),
        ({"SSH_CIDR": "10.0.0.0/0"}, "opens SSH to the internet"),
        ({"SSH_CIDR": ""}, "set SSH_CIDR"),
        ({"PREFIX": "team/hdebm"}, "give one folder name"),
        ({"COMMIT": "main"}, "give a full 40-digit commit hash"),
    ]
    for bad, message in bad_inputs:
        refused, calls, _ = run_setup("aws", tmp_path / "bad", **{**env, **bad})
        assert refused.returncode == 2 and message in refused.stderr and calls == []


# -- GCP


def test_gcp_workers_have_no_external_ip_and_head_and_workers_separate_service_accounts(launcher):
    _, gcp = launcher
    config = yaml.safe_load((ROOT / "cluster" / "gcp" / "hdebm-gpu.yaml").read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]["node_config"]
    (worker,) = [v["node_config"] for k, v in types.items() if k != config["head_node_type"]]
    assert "accessConfigs" not in worker["networkInterfaces"][0] and worker["tags"] == {"items": ["hdebm"]}
    assert head["tags"] == {"items": ["hdebm", "hdebm-head"]}  # only the head is a target of the SSH rule
    # every node names its interfaces, so Ray's subnet step (which would give each an external NAT) does nothing
    assert gcp._configure_subnet(config, compute=None) == config
    accounts = {head["serviceAccounts"][0]["email"], worker["serviceAccounts"][0]["email"]}
    assert accounts == {
        "hdebm-head@your-project-id.iam.gserviceaccount.com",
        "hdebm-worker@your-project-id.iam.gserviceaccount.com",
    }


def test_gcp_setup_makes_a_network_of_its_own_firewalled_to_the_cluster_and_the_users_ssh_range(tmp_path):
    done, calls, mine = run_setup("gcp", tmp_path, **{**ENV, "PROJECT": "lab", "REGION": "europe-west4"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0.0.0.0/0" not in json.dumps(calls)
    (network,) = [c for c in calls if c[3:6] == ["compute", "networks", "create"]]
    assert "--subnet-mode=custom" in network  # no default-allow-internal
    rules = {c[6]: c for c in calls if c[3:6] == ["compute", "firewall-rules", "create"]}
    assert set(rules) == {"hdebm-internal", "hdebm-head-ssh"}
    internal, ssh = rules["hdebm-internal"], rules["hdebm-head-ssh"]
    assert flag(internal, "--source-tags") == flag(internal, "--target-tags") == "hdebm"
    assert "--source-ranges" not in internal
    assert flag(ssh, "--source-ranges") == ENV["SSH_CIDR"] and flag(ssh, "--target-tags") == "hdebm-head"
    assert flag(ssh, "--allow") == "tcp:22"
    storage = [c for c in calls if c[3:6] == ["storage", "buckets", "add-iam-policy-binding"]]
    objects = [c for c in storage if flag(c, "--role") == "roles/storage.objectUser"]
    assert len(storage) == 4 and len(objects) == 2  # objects under the prefix, and the bucket's metadata and names
    prefix = "resource.name.startsWith('projects/_/buckets/lab-runs/objects/team-hdebm/')"
    assert all(flag(c, "--condition") == f"expression={prefix},title=hdebm-runs-prefix" for c in objects)
    assert {flag(c, "--role") for c in storage} == {"roles/storage.objectUser", "roles/storage.legacyBucketReader"}
    project = [c for c in calls if c[3:5] == ["projects", "add-iam-policy-binding"]]
    assert [(flag(c, "--member"), flag(c, "--role")) for c in project] == [
        ("serviceAccount:hdebm-head@lab.iam.gserviceaccount.com", "roles/compute.instanceAdmin.v1")
    ]
    (act_as,) = [c for c in calls if c[3:6] == ["iam", "service-accounts", "add-iam-policy-binding"]]
    assert act_as[6] == "hdebm-worker@lab.iam.gserviceaccount.com"  # on the worker account, not the project
    config = yaml.safe_load(mine.read_text())
    validate_launcher(config)
    assert "your-project-id" not in mine.read_text() and config["provider"]["availability_zone"] == "europe-west4-a"
    assert f"@{COMMIT}" in mine.read_text()
    refused, calls, _ = run_setup("gcp", tmp_path / "bad", **{**ENV, "PROJECT": "lab", "SSH_CIDR": "0.0.0.0/0"})
    assert refused.returncode == 2 and "opens SSH to the internet" in refused.stderr and calls == []


# -- KubeRay


def test_kuberay_pods_run_as_non_root_without_privileges_or_an_api_token_they_do_not_need():
    for path in KUBERAY:
        doc = yaml.safe_load(path.read_text())
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
        pods |= {g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]}
        if doc["kind"] == "RayJob":
            pods["submitter"] = doc["spec"]["submitterPodTemplate"]["spec"]
        for name, pod in pods.items():
            context = pod["securityContext"]
            assert context["runAsNonRoot"] is True and context["runAsUser"] != 0, (path, name)
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, (path, name)
            for c in pod["containers"]:
                assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
            # only a head with KubeRay's autoscaler sidecar talks to the Kubernetes API
            needs_token = name == "head" and spec.get("enableInTreeAutoscaling", False)
            assert pod.get("automountServiceAccountToken", True) is needs_token, (path, name)
        if spec.get("enableInTreeAutoscaling"):
            sidecar = spec["autoscalerOptions"]["securityContext"]
            assert sidecar["allowPrivilegeEscalation"] is False and sidecar["capabilities"] == {"drop": ["ALL"]}


def test_every_documented_apply_of_a_ray_cluster_applies_the_network_policy():
    applies = []
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "cluster").rglob("*.yaml")]:
        applies += [(doc, line) for line in doc.read_text().splitlines() if "kubectl apply" in line]
    cluster_applies = [(d, line) for d, line in applies if re.search(r"raycluster\.yaml|rayjob-[a-z]+\.yaml", line)]
    assert len(cluster_applies) >= 3
    for doc, line in cluster_applies:
        assert "-f cluster/kuberay/networkpolicy.yaml" in line, (doc, line)


# -- what leaves the machine


def checkout_with_secrets(tmp_path: Path) -> Path:
    """This checkout's tracked files (as a fresh clone has them), with secrets and data planted among them."""
    repo = tmp_path / "repo"
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True
        )
    except FileNotFoundError:  # no git on this machine
        listed = subprocess.CompletedProcess([], 1)
    if listed.returncode == 0:
        tracked = listed.stdout.splitlines()
    else:  # a checkout without git: everything but what git would ignore
        top, anywhere = {".git", ".venv", "runs", "data"}, {"__pycache__", ".pytest_cache", ".ruff_cache"}
        tracked = [
            p.relative_to(ROOT).as_posix()
            for p in ROOT.rglob("*")
            if p.is_file()
            and p.relative_to(ROOT).parts[0] not in top
            and not anywhere & set(p.relative_to(ROOT).parts)
            and ".egg-info" not in str(p)
        ]
    for name in tracked:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    for name in SECRETS + ["hdebm_ray/__pycache__/main.cpython-311.pyc"]:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("secret")
    return repo


def test_a_job_uploads_only_the_package_presets_tune_spaces_and_jobs(tmp_path):
    from zipfile import ZipFile

    from ray._private.runtime_env.packaging import _zip_files

    repo = checkout_with_secrets(tmp_path)
    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    _zip_files(str(repo), env["excludes"], str(tmp_path / "upload.zip"), include_gitignore=True)
    names = set(ZipFile(tmp_path / "upload.zip").namelist())
    assert {n.split("/")[0] for n in names} == {"hdebm_ray", "tune_spaces", "jobs", "pyproject.toml"}
    assert not names & set(SECRETS) and not [n for n in names if "__pycache__" in n]
    assert {"hdebm_ray/cli/main.py", "hdebm_ray/presets/cifar10.yaml", "tune_spaces/stage1.yaml"} <= names
    assert "jobs/runtime_env.yaml" in names


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule (moby/patternmatcher): the last pattern matching the path or one of its parent folders decides;
    `*` stays within one path element, `**` spans any, a leading `!` re-includes."""

    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + "$")

    parts, excluded = path.split("/"), False
    for raw in patterns:
        include = raw.startswith("!")
        rx = regex(raw.lstrip("!").strip("/"))
        if any(rx.match("/".join(parts[: i + 1])) for i in range(len(parts))):
            excluded = not include
    return excluded


def test_the_image_build_context_is_an_allow_list(tmp_path):
    repo = checkout_with_secrets(tmp_path)
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"  # everything out, then the allow-list
    files = [p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()]
    context = {f for f in files if not dockerignore_excludes(patterns, f)}
    assert {f.split("/")[0] for f in context} == {"hdebm_ray", "pyproject.toml", "README.md", "cluster"}
    assert [f for f in context if f.startswith("cluster/")] == ["cluster/constraints.txt"]
    assert not context & set(SECRETS) and not [f for f in context if "__pycache__" in f]
    assert "hdebm_ray/presets/cifar10.yaml" in context
    # what pip needs to build the package is there: the readme pyproject.toml names, every package module
    assert {f for f in files if f.startswith("hdebm_ray/") and f.endswith(".py") and "__pycache__" not in f} <= context


# -- the same software on every node


def test_every_node_installs_one_commit_with_exact_versions():
    from importlib import metadata

    from packaging.requirements import Requirement

    from hdebm_ray.io.software import PINNED

    pins = {}
    for line in (ROOT / "cluster" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    assert set(PINNED) <= set(pins)
    for dependency in metadata.requires("hdebm-ray"):
        req = Requirement(dependency)
        if req.marker is None:  # the runtime dependencies, not the extras
            assert req.specifier.contains(pins[req.name.lower()], prereleases=True), (req, pins[req.name.lower()])
    for provider in ("aws", "gcp"):
        config = yaml.safe_load((ROOT / "cluster" / provider / "hdebm-gpu.yaml").read_text())
        assert config["file_mounts"]["~/hdebm-constraints.txt"] == "cluster/constraints.txt"
        (install,) = [c for c in config["setup_commands"] if "pip install" in c]
        assert "--constraint ~/hdebm-constraints.txt" in install
        assert re.search(r"\.git@[0-9a-f]{40}\"$", install), install  # a commit, never a branch
    dockerfile = (ROOT / "cluster" / "kuberay" / "Dockerfile").read_text()
    assert "--constraint /home/ray/constraints.txt" in dockerfile and "\nUSER ray" in dockerfile


@pytest.mark.skipif(sys.platform != "linux", reason="the fingerprint's sources are read the same way everywhere")
def test_the_code_digest_changes_with_any_source_file_and_only_with_sources(tmp_path):
    from hdebm_ray.io.software import code_digest

    copy = tmp_path / "hdebm_ray"
    shutil.copytree(ROOT / "hdebm_ray", copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_digest(copy)
    assert before == code_digest(ROOT / "hdebm_ray")
    (copy / "__pycache__").mkdir(exist_ok=True)
    (copy / "__pycache__" / "x.pyc").write_bytes(b"compiled")
    assert code_digest(copy) == before  # caches are not code
    (copy / "presets" / "digits.yaml").write_text((copy / "presets" / "digits.yaml").read_text() + "\n# edit\n")
    assert code_digest(copy) != before
