"""`defect-tune submit` and `defect-tune jobs`: what a job carries (fast, no Ray cluster), and real
jobs on a real token-authenticated Ray head on loopback (slow: a sweep runs as a job).

The slow tests start their own head with `ray start --head --block` in a new session and stop it by
the process ids it started, not with `ray stop` (which would stop every Ray cluster on the machine).
"""

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import psutil
import pytest
import requests
from conftest import read_csv

from defect_tune.search import submit
from defect_tune.search.submit import SubmitError

FAKE_KEY = "wandb-test-key-" + "0123456789abcdef" * 2  # must never leave this process's environment


@pytest.fixture
def fresh_token_cache():
    """Ray's token loader caches in C++ for the whole process; later tests must not see our fakes."""
    from ray._raylet import AuthenticationTokenLoader

    yield
    AuthenticationTokenLoader.instance().reset_cache()


def test_the_entrypoint_is_the_command_quoted_for_a_shell():
    args = ["search", "--name", "it's a sweep", "--storage", "s3://bucket/a b", "--out", "/shared/r;rm -rf /"]
    command = submit.entrypoint(args)
    assert command.startswith("python -m defect_tune search ")
    assert shlex.split(command) == ["python", "-m", "defect_tune", *args]


def test_runtime_env_ships_the_checkout_and_wandb_settings_but_never_the_key(tmp_path):
    environ = {"WANDB_MODE": "offline", "WANDB_ENTITY": "team", "WANDB_API_KEY": FAKE_KEY, "HOME": "/root"}
    env = submit.runtime_env(tmp_path, environ)
    assert env["working_dir"] == str(tmp_path.absolute())
    assert env["env_vars"] == {"PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "WANDB_ENTITY": "team"}
    assert FAKE_KEY not in json.dumps(env)
    assert submit.kept_back(environ) == ["WANDB_API_KEY"]
    assert submit.runtime_env(None, {}) == {"env_vars": {"PYTHONUNBUFFERED": "1"}}  # code from the cluster's image


def test_the_upload_as_ray_packs_it_has_the_code_and_none_of_the_bulk(tmp_path):
    from ray._private.runtime_env.packaging import _zip_files

    checkout = tmp_path / "checkout"
    files = ["pyproject.toml", "defect_tune/data/shards.py", "defect_tune/cli.py", "search_spaces/quick.yaml",
             "tests/data/x.txt",
             "data/synthetic/meta.json", "results/demo/leaderboard.csv", ".venv/bin/python", ".git/HEAD",
             "wandb/run/x.wandb", "defect_tune/__pycache__/cli.pyc", "defect_tune.egg-info/PKG-INFO"]
    for name in files:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text("x")
    _zip_files(str(checkout), list(submit.EXCLUDES), str(tmp_path / "upload.zip"), include_gitignore=False)
    packed = {n for n in zipfile.ZipFile(tmp_path / "upload.zip").namelist() if not n.endswith("/")}
    assert packed == {"pyproject.toml", "defect_tune/data/shards.py", "defect_tune/cli.py", "search_spaces/quick.yaml",
                      "tests/data/x.txt"}


def test_the_default_code_is_this_checkout():
    assert (submit.default_working_dir() / "defect_tune" / "search" / "submit.py").is_file()


def test_dashboard_from_option_then_environment_then_the_local_default():
    assert submit.dashboard_address("http://head:8265/", {"RAY_ADDRESS": "http://other:8265"}) == "http://head:8265"
    assert submit.dashboard_address(None, {"RAY_ADDRESS": "10.0.0.5:8265"}) == "http://10.0.0.5:8265"
    assert submit.dashboard_address(None, {"RAY_API_SERVER_ADDRESS": "https://a:443", "RAY_ADDRESS": "b"}) == "https://a:443"
    assert submit.dashboard_address(None, {}) == "http://127.0.0.1:8265"
    with pytest.raises(SubmitError, match="dashboard's URL"):
        submit.dashboard_address("ray://head:10001", {})


def test_the_token_is_found_as_ray_finds_it_and_disabled_sends_none(tmp_path, monkeypatch, fresh_token_cache):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert submit.auth_headers() == {}  # nothing to send; a cluster that wants a token says so
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-the-file")
    assert submit.auth_headers() == {"authorization": "Bearer from-the-file"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-the-env")  # Ray's order: the variable wins
    assert submit.auth_headers() == {"authorization": "Bearer from-the-env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert submit.auth_headers() == {}
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(SubmitError, match="RAY_AUTH_TOKEN_PATH=.*missing: no token in that file"):
        submit.auth_headers()
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    (tmp_path / ".ray" / "auth_token").unlink()
    with pytest.raises(SubmitError, match="RAY_AUTH_MODE=token but no token found"):
        submit.auth_headers()


def test_commands_and_paths_are_checked_before_anything_is_sent():
    commands = {"search", "retrain", "train"}
    submit.check_command(["search", "--space", "s.yaml"], commands)
    with pytest.raises(SubmitError, match="nothing to run"):
        submit.check_command([], commands)
    with pytest.raises(SubmitError, match="'jobs' is not a defect-tune command to submit"):
        submit.check_command(["jobs", "list"], commands)
    notes = submit.path_notes(["search", "--data", "data/synthetic", "--storage=s3://b/p"])
    assert (len(notes) == 2 and "without --out" in notes[0]
            and notes[1].startswith("--data data/synthetic: a relative path"))
    assert submit.path_notes(["search", "--data", "/shared/d", "--out", "/shared/r", "--storage", "/shared/t"]) == []


def test_ray_errors_become_one_line_reasons():
    import requests as http
    from ray.exceptions import AuthenticationError

    def reason(error, token_sent=True, job_id="j1"):
        with (pytest.raises(SubmitError) as caught,
              submit.Cluster(None, "http://head:8265", token_sent).requests(job_id)):
            raise error
        return caught

    assert reason(RuntimeError("Request failed with status code 404: Job j1 does not exist.")).type is submit.UnknownJob
    server_traceback = ("Request failed with status code 500: Traceback (most recent call last):\n  File x\n"
                        "ValueError: Job with submission_id j1 already exists.\n.\n.")
    assert str(reason(RuntimeError(server_traceback)).value).endswith(
        "answered: ValueError: Job with submission_id j1 already exists.")
    assert "refused the token" in str(reason(AuthenticationError("403")).value)
    assert "requires a token and none was found" in str(reason(AuthenticationError("401"), token_sent=False).value)
    assert "cannot reach a Ray dashboard at http://head:8265" in str(reason(http.exceptions.ConnectionError()).value)


def defect_tune(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "defect_tune", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_an_unreachable_cluster_is_one_line_and_exit_2():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = defect_tune("jobs", "status", "raysubmit_x", "--dashboard", f"http://127.0.0.1:{port}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cannot reach a Ray dashboard at http://127.0.0.1:{port}" in result.stderr


# ---------------------------------------------------------------- a real head on loopback (slow)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:  # all bound at once, so no two are the same
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Head:
    def __init__(self, url: str, gcs: str, token: str, temp_dir: Path):
        self.url, self.gcs, self.token, self.temp_dir = url, gcs, token, temp_dir

    def env(self, **extra) -> dict:
        """The environment of a user who holds this cluster's token (and nothing from other clusters)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_"))}
        return {**env, "RAY_AUTH_TOKEN": self.token, **extra}

    def session_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.temp_dir.glob("session_2*/logs/**/*") if p.is_file())


@pytest.fixture(scope="module")
def head():
    """A Ray head with token auth on (Ray 2.60's default when a token exists; explicit here), dashboard on loopback."""
    from ray._private.services import find_gcs_addresses

    if running := find_gcs_addresses():  # two clusters on one machine disturb each other (see search.py)
        pytest.fail(f"another Ray cluster is running on this machine ({', '.join(running)}); "
                    "these tests start their own")
    token = secrets.token_hex(32)
    temp_dir = Path(tempfile.mkdtemp(prefix="dt-ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    gcs_port, dashboard_port, agent_port, client_port = _free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # The image's `python` runs a job's entrypoint: here, this virtualenv's, as if it were activated.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # SIGTERM stops at once, not after a 30 s drain
    ray_cli = Path(sys.executable).with_name("ray")
    log = open(temp_dir / "ray-start.log", "w")
    process = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--block", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={agent_port}",
         f"--ray-client-server-port={client_port}", "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (temp_dir / "ray-start.log").read_text()[-3000:]
            try:
                ready = requests.get(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=2).ok
                if ready and (temp_dir / "ray_current_cluster").is_file():  # written once the head is up
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the Ray head's dashboard did not come up in 120 s"
            time.sleep(1)
        yield Head(url, (temp_dir / "ray_current_cluster").read_text().strip(), token, temp_dir)
    finally:
        started = []
        if process.poll() is None:
            started = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        process.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        _, alive = psutil.wait_procs([p for p in started if p.is_running()], timeout=15)
        for p in alive:  # by the ids this fixture started, never by name
            p.kill()
        log.close()
        time.sleep(1)  # the last processes' log writes
        shutil.rmtree(temp_dir, ignore_errors=True)


def write_space(tmp_path: Path, num_samples: int, max_epochs: int) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(
        f"num_samples: {num_samples}\nmax_epochs: {max_epochs}\n"
        f"asha: {{grace_period: {max_epochs}, reduction_factor: 2}}\n"
        "fixed: {model: el_cnn, batch_size: 64, augment: light, warmup_epochs: 0, early_stopping_patience: 0}\n"
        "params:\n  lr: {loguniform: [1.0e-4, 3.0e-3]}\n"
    )
    return path


@pytest.mark.slow
def test_submit_follow_runs_a_sweep_on_the_cluster_and_leaves_its_leaderboard_in_shared_storage(
        head, synthetic_data, tmp_path):
    shared = tmp_path / "shared"
    env = head.env(WANDB_MODE="offline", WANDB_API_KEY=FAKE_KEY)
    started = time.monotonic()
    result = defect_tune(
        "submit", "--dashboard", head.url, "--follow", "--job-id", "sweep-on-loopback", "--",
        # The data as a URI (what s3://... takes on a real cluster; file:// is the same code path).
        "search", "--data", synthetic_data.absolute().as_uri(), "--space", write_space(tmp_path, 2, 1),
        "--name", "loopback",
        "--storage", shared / "tune", "--out", shared / "results" / "loopback",
        env=env, timeout=900,
    )
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert result.stdout.splitlines()[0] == "sweep-on-loopback"
    assert "sweep loopback: 2 trials" in result.stdout  # the job's own output, streamed
    assert "sweep-on-loopback SUCCEEDED" in result.stderr
    assert "WANDB_API_KEY is not sent" in result.stderr
    board = read_csv(shared / "results" / "loopback" / "leaderboard.csv")
    assert len(board) == 2 and board["stop_reason"].eq("completed").all()
    assert (shared / "tune" / "loopback").is_dir()  # the Tune experiment, in the shared storage
    shipped = [p for p in head.temp_dir.glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert (len(shipped) == 1
            and (shipped[0] / "defect_tune" / "search" / "submit.py").is_file())  # the job ran this checkout
    assert not any((shipped[0] / name).exists() for name in (".git", "data", "results"))

    status = defect_tune("jobs", "status", "sweep-on-loopback", "--dashboard", head.url, env=head.env())
    assert status.returncode == 0 and status.stdout.startswith("sweep-on-loopback SUCCEEDED")
    listed = defect_tune("jobs", "list", "--dashboard", head.url, env=head.env())
    assert "sweep-on-loopback SUCCEEDED" in listed.stdout

    details = requests.get(f"{head.url}/api/jobs/sweep-on-loopback",
                           headers={"Authorization": f"Bearer {head.token}"}).json()
    assert details["runtime_env"]["env_vars"] == {"PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    assert details["entrypoint"].startswith(
        f"python -m defect_tune search --data {synthetic_data.absolute().as_uri()} ")
    assert (json.loads((shared / "results" / "loopback" / "sweep.json").read_text())["data"]
            == synthetic_data.absolute().as_uri())
    logs = head.session_logs()
    assert "Creating runtime env" in logs and "WANDB_MODE" in logs  # the agent's log, which would have leaked it
    for output in (result.stdout, result.stderr, logs):
        assert FAKE_KEY not in output and head.token not in output
    print(f"submit --follow of a 2-trial sweep: {seconds:.0f} s")


@pytest.mark.slow
def test_jobs_stop_ends_a_running_sweep_and_gives_the_cluster_back(
        head, synthetic_data, tmp_path, monkeypatch, fresh_token_cache):
    result = defect_tune(
        "submit", "--dashboard", head.url, "--", "search", "--data", synthetic_data,
        "--space", write_space(tmp_path, 4, 200),
        "--name", "endless", "--storage", tmp_path / "tune", "--out", tmp_path / "results",
        env=head.env(),
    )
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip()
    assert f"stop: defect-tune jobs stop {job} --dashboard {head.url}" in result.stderr

    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
    cluster = submit.connect(head.url)
    deadline = time.monotonic() + 300
    while "[epoch 1/" not in submit.logs(cluster, job):  # trials hold the cluster's CPUs now
        assert str(submit.info(cluster, job).status) in ("PENDING", "RUNNING"), submit.logs(cluster, job)[-3000:]
        assert time.monotonic() < deadline, "no trial finished an epoch in 300 s"
        time.sleep(2)

    started = time.monotonic()
    stopped = defect_tune("jobs", "stop", job, "--dashboard", head.url, env=head.env())
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith(f"{job} STOPPED")
    assert str(submit.info(cluster, job).status) == "STOPPED"

    # Every CPU is free again once Ray has cleaned up the job's trials and placement groups.
    check = (
        "import json, time, ray\n"
        f"ray.init(address='{head.gcs}', log_to_driver=False)\n"
        "deadline = time.monotonic() + 60\n"
        "while ray.available_resources().get('CPU', 0) < 2 and time.monotonic() < deadline: time.sleep(0.5)\n"
        "print(json.dumps({'free': ray.available_resources().get('CPU', 0), "
        "'total': ray.cluster_resources()['CPU']}))\n"
    )
    probe = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=180,
                           env=head.env(RAY_AUTH_MODE="token"))
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == {"free": 2.0, "total": 2.0}
    print(f"jobs stop to all CPUs free: {time.monotonic() - started:.0f} s")


@pytest.mark.slow
def test_a_missing_or_wrong_token_and_an_unknown_job_are_one_line_errors(head, tmp_path):
    home = {"HOME": str(tmp_path)}  # no ~/.ray/auth_token
    missing = defect_tune("jobs", "list", "--dashboard", head.url, env={**head.env(**home), "RAY_AUTH_TOKEN": ""})
    assert missing.returncode == 2 and "requires a token and none was found" in missing.stderr
    wrong = defect_tune("jobs", "list", "--dashboard", head.url, env=head.env(RAY_AUTH_TOKEN="not-the-token", **home))
    assert wrong.returncode == 2 and "refused the token" in wrong.stderr and "not-the-token" not in wrong.stderr
    unknown = defect_tune("jobs", "status", "no-such-job", "--dashboard", head.url, env=head.env())
    assert unknown.returncode == 2 and f"no job 'no-such-job' on the cluster at {head.url}" in unknown.stderr
    # RAY_ADDRESS (often a GCS address in a user's shell) does not override --dashboard.
    listed = defect_tune("jobs", "list", "--all", "--dashboard", head.url, env=head.env(RAY_ADDRESS="127.0.0.1:1"))
    assert listed.returncode == 0, listed.stderr
    for result in (missing, wrong, unknown, listed):
        assert "Traceback" not in result.stderr and head.token not in result.stdout + result.stderr
