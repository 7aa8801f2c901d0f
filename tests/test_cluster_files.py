"""Every file under cluster/ is checked here, fast and offline.

- The Ray cluster launcher YAMLs validate against the JSON schema shipped in the ray package
  (ray/autoscaler/ray-schema.json) and pass Ray's own `validate_config` after `prepare_config`
  (what `ray up` runs before touching a cloud).
- The Kubernetes manifests are checked structurally: apiVersion/kind/metadata.name, the required
  spec fields of RayCluster, RayJob, Deployment and Service, containers with an image (and a
  command where KubeRay does not generate one), GPU limits in the Ray worker group, and that every
  cross reference (Secret keys, Services, the RayJob's cluster, service accounts, PVCs) resolves.
- Every `melora-tune ...` command line in these files and in cluster/README.md code blocks parses
  with the real CLI parser. A subcommand that does not exist yet fails here, naming it.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHERS = {"aws": CLUSTER / "aws.yaml", "gcp": CLUSTER / "gcp.yaml"}
K8S_FILES = sorted((CLUSTER / "k8s").glob("*.yaml"))
NAMESPACE = "melora"


def ray_schema() -> dict:
    ray_dir = Path(list(importlib.util.find_spec("ray").submodule_search_locations)[0])
    return json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())


# --------------------------------------------------------------------------------------------
# launcher YAMLs


@pytest.fixture(scope="module")
def schema_validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = ray_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_yaml_matches_ray_schema(cloud, schema_validator):
    config = yaml.safe_load(LAUNCHERS[cloud].read_text())
    errors = sorted(schema_validator.iter_errors(config), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_yaml_passes_ray_validate_config(cloud):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHERS[cloud].read_text())
    validate_config(config)
    validate_config(prepare_config(copy.deepcopy(config)))  # with the provider's defaults filled in


def test_the_schema_check_has_teeth(schema_validator):
    config = yaml.safe_load(LAUNCHERS["aws"].read_text())
    broken = copy.deepcopy(config)
    broken["head_start_ray_command"] = broken.pop("head_start_ray_commands")  # a typo'd key
    assert list(schema_validator.iter_errors(broken))
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_1x_a10g"]["resources"]["GPU"] = 0.5  # must be an integer
    assert list(schema_validator.iter_errors(broken))


@pytest.mark.parametrize("cloud,bucket", [("aws", "s3://"), ("gcp", "gs://")])
def test_launcher_yaml_content(cloud, bucket):
    config = yaml.safe_load(LAUNCHERS[cloud].read_text())
    text = LAUNCHERS[cloud].read_text()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(t.get("max_workers", 0) >= 1 and t.get("min_workers", 0) >= 0 for t in gpu_types)
    assert config["max_workers"] >= max(t["max_workers"] for t in gpu_types)
    # The project: the checkout is copied by file_mounts and installed after torch.
    assert config["file_mounts"] == {"~/melora-tune": "."}
    setup = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "pip install" in c and "torch" in c)
    project_at = next(i for i, c in enumerate(setup) if "pip install" in c and "-e ~/melora-tune" in c)
    assert torch_at < project_at
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])
    # Dashboard and MLflow on the head's loopback; shared storage is a bucket.
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "mlflow server" in head_start and "--host 127.0.0.1" in head_start
    assert f"--artifacts-destination {bucket}" in head_start
    assert re.search(rf"--storage-path {re.escape(bucket)}\S+", text)


# --------------------------------------------------------------------------------------------
# Kubernetes manifests


def k8s_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in K8S_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


DOCS = k8s_docs()
KIND_API = {
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
    "Deployment": "apps/v1",
    "Service": "v1",
    "Secret": "v1",
    "PersistentVolumeClaim": "v1",
    "Namespace": "v1",
    "ServiceAccount": "v1",
    "NetworkPolicy": "networking.k8s.io/v1",
}


def by_kind(kind: str) -> list[dict]:
    return [d for _, d in DOCS if d.get("kind") == kind]


def named(kind: str, name: str) -> dict | None:
    return next((d for d in by_kind(kind) if d["metadata"]["name"] == name), None)


def test_the_manifests_have_every_kind_needed():
    kinds = {d["kind"] for _, d in DOCS}
    assert {"RayCluster", "RayJob", "Deployment", "Service", "Secret", "NetworkPolicy"} <= kinds
    assert {d["metadata"]["name"] for d in by_kind("Deployment")} >= {"mlflow", "postgres"}


@pytest.mark.parametrize("doc", [d for _, d in DOCS], ids=[f"{f}:{d.get('kind')}/{d.get('metadata', {}).get('name')}" for f, d in DOCS])
def test_manifest_header(doc):
    assert doc.get("kind") in KIND_API, f"unexpected kind {doc.get('kind')}"
    assert doc.get("apiVersion") == KIND_API[doc["kind"]]
    name = doc.get("metadata", {}).get("name")
    assert isinstance(name, str) and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
    if doc["kind"] != "Namespace":
        assert doc["metadata"].get("namespace") == NAMESPACE


def pod_containers(pod_template: dict) -> list[dict]:
    containers = pod_template["spec"]["containers"]
    assert containers, "a pod template without containers"
    for c in containers:
        assert c.get("name") and isinstance(c.get("image"), str) and c["image"], c
    return containers


def check_pod_refs(pod_template: dict) -> None:
    spec = pod_template["spec"]
    if "serviceAccountName" in spec:
        assert named("ServiceAccount", spec["serviceAccountName"]), spec["serviceAccountName"]
    for vol in spec.get("volumes", []):
        if "persistentVolumeClaim" in vol:
            assert named("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"])
    mounted = {v["name"] for v in spec.get("volumes", [])}
    for c in spec["containers"]:
        for m in c.get("volumeMounts", []):
            assert m["name"] in mounted, f"{c['name']} mounts undefined volume {m['name']}"
        for env in c.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                secret = named("Secret", ref["name"])
                assert secret, f"Secret {ref['name']} is not defined"
                assert ref["key"] in {**secret.get("data", {}), **secret.get("stringData", {})}, ref


def gpu_limit(container: dict) -> float:
    return float(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def test_raycluster():
    (rc,) = by_kind("RayCluster")
    spec = rc["spec"]
    assert spec["rayVersion"].startswith("2.60")
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # no public IP
    head_containers = pod_containers(head["template"])
    check_pod_refs(head["template"])
    assert all(gpu_limit(c) == 0 for c in head_containers)
    groups = spec["workerGroupSpecs"]
    assert groups
    gpu_groups = []
    for g in groups:
        assert g["groupName"] and isinstance(g["rayStartParams"], dict)
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        containers = pod_containers(g["template"])
        check_pod_refs(g["template"])
        for c in containers:
            if gpu_limit(c):
                requests = c["resources"].get("requests", {})
                assert float(requests.get("nvidia.com/gpu", gpu_limit(c))) == gpu_limit(c)  # extended resources: requests == limits
                gpu_groups.append(g)
    assert gpu_groups, "no worker group has an nvidia.com/gpu limit"
    assert all(int(gpu_limit(c)) == gpu_limit(c) for g in gpu_groups for c in g["template"]["spec"]["containers"])


def test_rayjob():
    (job,) = by_kind("RayJob")
    spec = job["spec"]
    assert isinstance(spec["entrypoint"], str)
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec)
    if "clusterSelector" in spec:
        assert named("RayCluster", spec["clusterSelector"]["ray.io/cluster"]), "the RayJob selects an unknown RayCluster"
        assert spec.get("shutdownAfterJobFinishes", False) is False  # KubeRay refuses it with clusterSelector
    argv = shlex.split(spec["entrypoint"].split("&&")[-1])
    assert argv[:2] == ["melora-tune", "search"]
    assert "search_spaces/glue_sst2_roberta_base.yaml" in argv
    assert argv[argv.index("--storage-path") + 1].startswith("s3://")
    assert argv[argv.index("--tracking-uri") + 1] == "http://mlflow:5000"
    mlflow_svc = named("Service", "mlflow")
    assert mlflow_svc and any(p["port"] == 5000 for p in mlflow_svc["spec"]["ports"])
    if "submitterPodTemplate" in spec:
        pod_containers(spec["submitterPodTemplate"])
        check_pod_refs(spec["submitterPodTemplate"])


@pytest.mark.parametrize("dep", by_kind("Deployment"), ids=[d["metadata"]["name"] for d in by_kind("Deployment")])
def test_deployment(dep):
    spec = dep["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    for c in pod_containers(spec["template"]):
        assert c.get("command"), f"container {c['name']} has no command"
        assert all(isinstance(x, str) for x in c["command"] + c.get("args", []))
    check_pod_refs(spec["template"])


@pytest.mark.parametrize("svc", by_kind("Service"), ids=[d["metadata"]["name"] for d in by_kind("Service")])
def test_service(svc):
    spec = svc["spec"]
    assert spec.get("type", "ClusterIP") == "ClusterIP", "services stay on the cluster network"
    assert spec["ports"] and all(isinstance(p["port"], int) for p in spec["ports"])
    targets = [d for d in by_kind("Deployment") if spec["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    assert len(targets) == 1, f"selector {spec['selector']} matches {len(targets)} deployments"
    ports = {p["containerPort"] for c in targets[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    assert all(p.get("targetPort", p["port"]) in ports for p in spec["ports"])


def test_mlflow_server():
    dep = named("Deployment", "mlflow")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = c["command"] + c.get("args", [])
    assert args[:2] == ["mlflow", "server"]
    flags = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
    assert flags["--artifacts-destination"].startswith("s3://")
    assert flags["--port"] == "5000"
    assert {"mlflow:5000", "mlflow.melora.svc.cluster.local:5000"} <= set(flags["--allowed-hosts"].split(","))
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "backend-store-uri"}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    secret = named("Secret", "mlflow-db")
    assert secret["stringData"]["backend-store-uri"].startswith("postgresql://")
    assert "@postgres:5432/" in secret["stringData"]["backend-store-uri"] and named("Service", "postgres")
    # Only the namespace reaches MLflow, only MLflow reaches PostgreSQL.
    policies = {p["spec"]["podSelector"]["matchLabels"]["app"]: p for p in by_kind("NetworkPolicy")}
    assert policies["mlflow"]["spec"]["ingress"][0]["from"] == [{"podSelector": {}}]
    assert policies["postgres"]["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {"app": "mlflow"}}}]


def test_dockerfile_matches_the_ray_pin():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert base.startswith("rayproject/ray:2.60.") and "py311" in base
    assert text.index('"torch>=2.4"') < text.index("pip install --no-cache-dir -e .")


# --------------------------------------------------------------------------------------------
# melora-tune command lines

# `melora-tune` at the start of a shell command: line start (after comment/list markers), after
# && || ; | $( nohup exec or an opening quote, optionally as .../bin/melora-tune; followed by a
# subcommand or an option (so "melora-tune @ git+..." and paths like ~/melora-tune are not commands).
COMMAND = re.compile(
    r"""(?:^|&&|\|\||;|\||\$\(|\bnohup\s+|\bexec\s+|["'])\s*(?:[\w.~-]*/)*(melora-tune(?=[ \t]+(?:[a-z][\w-]*|-{1,2}\w)).*)$"""
)
END = re.compile(r"""&&|\|\||[;|&>"'`]|\s#""")


def _logical_lines(text: str) -> list[tuple[int, str]]:
    out, buf, start = [], "", None
    for i, raw in enumerate(text.splitlines(), 1):
        if start is None:
            start = i
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        out.append((start, buf + raw))
        buf, start = "", None
    return out


def commands_in(text: str) -> list[tuple[int, str]]:
    found = []
    for lineno, line in _logical_lines(text):
        line = line.strip()
        line = re.sub(r"^(#+\s*|-\s+|\$\s+)+", "", line)  # comment, YAML list item, shell prompt
        for m in COMMAND.finditer(line):
            cmd = END.split(m.group(1), maxsplit=1)[0].strip()
            found.append((lineno, cmd))
    return found


def readme_code_blocks(text: str) -> str:
    """The README with everything outside fenced code blocks blanked (line numbers kept)."""
    keep, inside = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
            keep.append("")
        else:
            keep.append(line if inside else "")
    return "\n".join(keep)


def yaml_multiline_strings(path: Path) -> list[str]:
    out = []

    def walk(node):
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str) and "\n" in node:
            out.append(node)

    for doc in yaml.safe_load_all(path.read_text()):
        walk(doc)
    return out


def all_commands() -> list[tuple[str, int, str]]:
    found = []
    sources = [*LAUNCHERS.values(), *K8S_FILES, CLUSTER / "Dockerfile"]
    for path in sources:
        rel = path.relative_to(ROOT).as_posix()
        found += [(rel, n, c) for n, c in commands_in(path.read_text())]
        if path.suffix == ".yaml":  # folded / literal blocks (a multi-line entrypoint)
            seen = {c for f, _, c in found if f == rel}
            for block in yaml_multiline_strings(path):
                found += [(rel, 0, c) for _, c in commands_in(block) if c not in seen]
    readme = CLUSTER / "README.md"
    found += [("cluster/README.md", n, c) for n, c in commands_in(readme_code_blocks(readme.read_text()))]
    return found


COMMANDS = all_commands()


def test_the_command_scan_finds_the_commands():
    cmds = [c for _, _, c in COMMANDS]
    assert any(c.startswith("melora-tune search search_spaces/glue_sst2_roberta_base.yaml") for c in cmds)
    assert any(c.startswith("melora-tune cluster up") for c in cmds)
    assert {f for f, _, _ in COMMANDS} >= {"cluster/aws.yaml", "cluster/gcp.yaml", "cluster/k8s/rayjob.yaml", "cluster/README.md"}
    # and leaves out what is not a command
    assert commands_in('pip install "melora-tune @ git+https://x/melora-tune.git"\npip install -e ~/melora-tune boto3') == []
    assert commands_in('cd /app && melora-tune search a.yaml --x 1 > log 2>&1 &') == [(1, "melora-tune search a.yaml --x 1")]


@pytest.mark.parametrize("where,cmd", [(f"{f}:{n}", c) for f, n, c in COMMANDS], ids=[f"{f}:{n}:{c.split()[1]}" for f, n, c in COMMANDS])
def test_command_line_parses(where, cmd, capsys):
    from melora_tune.cli import build_parser

    parser = build_parser()
    argv = shlex.split(cmd)
    assert argv[0] == "melora-tune"
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as exit_:
        err = capsys.readouterr().err.strip()
        if exit_.code == 0:  # --version / --help
            return
        pytest.fail(f"{where}: `{cmd}` does not parse with melora_tune.cli: {err}")
    assert callable(getattr(args, "func", None)), f"{where}: `{cmd}` parses but names no command function"


@pytest.mark.parametrize(
    "where,space",
    sorted({(f"{f}:{n}", a) for f, n, c in COMMANDS for a in shlex.split(c) if a.startswith("search_spaces/")}),
)
def test_referenced_search_spaces_exist(where, space):
    assert (ROOT / space).is_file(), f"{where} runs {space}, which does not exist"
