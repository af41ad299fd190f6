"""`defect-tune submit` and `defect-tune jobs`: run a defect-tune command on a Ray cluster through
Ray's Job Submission API, then follow, inspect or stop it.

What travels with a job, and what does not:

- **The code.** The local checkout becomes the job's `working_dir` (without data, results,
  virtualenvs, git or W&B files), and the entrypoint is `python -m defect_tune COMMAND ...`, so
  the job runs exactly the code you have. The dependencies do not travel: the cluster's image
  must have them, in the `python` first on its PATH (torch and the rest of pyproject.toml's pins;
  `pip` in a runtime_env would download gigabytes for every job). `--no-working-dir` runs the
  defect-tune installed in the image instead.
- **W&B settings that are not secrets** (WANDB_MODE, WANDB_ENTITY, WANDB_BASE_URL), copied from
  this environment when set. Never WANDB_API_KEY: Ray writes a job's runtime_env in plain text to
  its runtime-env agent log ("Creating runtime env: {...}") and shows it with the job in the
  dashboard and the Jobs API. The key belongs on the cluster, as an environment variable of the
  head node (where the W&B logging actors run; on KubeRay, `valueFrom.secretKeyRef`); without it
  a sweep logs offline, and WANDB_MODE=online fails at once saying so.
- **The cluster token** (Ray 2.60 token authentication): sent as `Authorization: Bearer ...`,
  found as Ray finds it (RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else
  ~/.ray/auth_token). RAY_AUTH_MODE=disabled sends none. The token is never printed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import shlex
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from defect_tune.core.errors import UserError
from defect_tune.ray_compat import auth_token_headers

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
CHECKOUT = Path(__file__).resolve().parents[2]
# gitignore patterns, relative to the working directory, as Ray matches them (pathspec): what a
# job never needs, and what would push the upload past Ray's 500 MiB limit.
EXCLUDES = ("/.git", ".venv", "venv", "/data", "/results", "wandb", "__pycache__", "*.egg-info",
            ".pytest_cache", "/build", "/.device-pkgs")
SHARED_ENV = ("WANDB_MODE", "WANDB_ENTITY", "WANDB_BASE_URL")
KEPT_BACK_ENV = ("WANDB_API_KEY",)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
SUBMITTED_BY = "defect-tune"


class SubmitError(UserError):
    """A submission or job request that cannot go through; the message says why (never the token)."""


class UnknownJob(SubmitError):
    """No job with that id on the cluster."""


def dashboard_address(address: str | None, environ: Mapping[str, str]) -> str:
    """The Jobs API's URL: --dashboard, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS, else the local default."""
    address = address or environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if address == "auto" or address.startswith("ray://"):
        raise SubmitError(f"{address!r} is a cluster address; --dashboard takes the Ray dashboard's URL, "
                          "e.g. http://HEAD:8265")
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def auth_headers() -> dict[str, str]:
    """The Authorization header for a token-authenticated cluster, or none, from this process's
    environment (Ray's loader reads the variables and files itself).

    Ray's own client adds the header only when RAY_AUTH_MODE=token is set here, so a fresh shell
    gets "Authentication token is missing" from a cluster that demands one. As `ray start` does,
    an unset mode means: use the token if there is one.
    """
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode == "disabled":
        return {}
    from ray.exceptions import AuthenticationError

    try:
        headers = auth_token_headers()
    except AuthenticationError:  # RAY_AUTH_TOKEN_PATH names a missing or empty file
        raise SubmitError(f"RAY_AUTH_TOKEN_PATH={os.environ.get('RAY_AUTH_TOKEN_PATH')}: "
                          "no token in that file") from None
    if not headers and mode == "token":
        raise SubmitError("RAY_AUTH_MODE=token but no token found: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, "
                          "or put it in ~/.ray/auth_token (`ray get-auth-token` on the head node prints it)")
    return headers


@dataclass
class Cluster:
    """A connected Jobs API client, and what its error messages need to know."""

    client: object  # ray.job_submission.JobSubmissionClient
    address: str
    token_sent: bool

    @contextmanager
    def requests(self, job_id: str | None = None) -> Iterator[None]:
        """Ray's errors as one line each: unreachable, token missing or refused, unknown job."""
        import aiohttp
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError:
            raise SubmitError(self._auth_refused()) from None
        except aiohttp.WSServerHandshakeError as error:
            if error.status in (401, 403):
                raise SubmitError(self._auth_refused()) from None
            if error.status == 404 and job_id:
                raise UnknownJob(f"no job {job_id!r} on the cluster at {self.address}") from None
            raise SubmitError(f"the Ray dashboard at {self.address} refused the log stream: "
                              f"HTTP {error.status}") from None
        except (ConnectionError, requests.exceptions.ConnectionError, aiohttp.ClientConnectionError):
            raise SubmitError(_unreachable(self.address)) from None
        except RuntimeError as error:  # the SDK's "Request failed with status code N: <body>"
            text = str(error)
            if job_id and ("status code 404" in text or "does not exist" in text):
                raise UnknownJob(f"no job {job_id!r} on the cluster at {self.address}") from None
            # A server-side traceback in the body: its last line is the reason.
            lines = [line.strip() for line in text.splitlines() if line.strip(" .")]
            raise SubmitError(f"the Ray dashboard at {self.address} answered: {lines[-1] if lines else text}") from None

    def _auth_refused(self) -> str:
        if self.token_sent:
            return (f"the cluster at {self.address} refused the token: it is not this cluster's "
                    "(check RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
            return f"the cluster at {self.address} requires a token, and RAY_AUTH_MODE=disabled here sends none"
        return (f"the cluster at {self.address} requires a token and none was found: set RAY_AUTH_TOKEN or "
                "RAY_AUTH_TOKEN_PATH, or put it in ~/.ray/auth_token (`ray get-auth-token` on the head node prints it)")


def _unreachable(address: str) -> str:
    return (f"cannot reach a Ray dashboard at {address}: is the cluster up, and is this its dashboard "
            "address (port 8265 by default; --dashboard or RAY_API_SERVER_ADDRESS)?")


@contextmanager
def _without_env(*names: str) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None, timeout: float = 5.0) -> Cluster:
    url = dashboard_address(address, os.environ)
    parts = urlsplit(url)
    try:  # the SDK's requests have no timeout: a host that drops packets would hang for minutes
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                 timeout).close()
    except (OSError, ValueError):
        raise SubmitError(_unreachable(url)) from None
    headers = auth_headers()
    from ray.job_submission import JobSubmissionClient

    # Ray's client logs a line per file its upload skips, per package and per closed log stream,
    # and warns that it leaves .git out (so do we): quiet, so the job's own output stands out.
    for name, level in (("ray.dashboard.modules.dashboard_sdk", logging.WARNING),
                        ("ray.dashboard.modules.job.sdk", logging.WARNING),
                        ("ray._private.runtime_env.packaging", logging.WARNING),
                        ("ray._private.runtime_env.working_dir", logging.ERROR)):
        logging.getLogger(name).setLevel(level)

    cluster = Cluster(None, url, bool(headers))
    with cluster.requests(), _without_env("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        # Ray lets those two variables override the address it is given; here --dashboard wins.
        cluster.client = JobSubmissionClient(url, headers=headers)
    return cluster


def default_working_dir() -> Path:
    if (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / "defect_tune").is_dir():
        return CHECKOUT
    raise SubmitError(f"defect_tune runs from an installed copy ({CHECKOUT}), not a checkout: pass --working-dir "
                      "CHECKOUT, or --no-working-dir to run the defect-tune installed in the cluster's image")


def entrypoint(args: list[str]) -> str:
    return shlex.join(["python", "-m", "defect_tune", *args])


def runtime_env(working_dir: Path | None, environ: Mapping[str, str]) -> dict:
    # Unbuffered, so that `--follow` shows the job's output as it is written.
    env_vars = {"PYTHONUNBUFFERED": "1", **{name: environ[name] for name in SHARED_ENV if environ.get(name)}}
    env: dict = {"env_vars": env_vars}
    if working_dir is not None:
        env.update(working_dir=str(Path(working_dir).absolute()), excludes=list(EXCLUDES))
    return env


def check_command(args: list[str], commands: set[str]) -> None:
    if not args:
        raise SubmitError("nothing to run: give the defect-tune command after `--`, e.g. submit -- search --space ...")
    if args[0] not in commands:
        raise SubmitError(f"{args[0]!r} is not a defect-tune command to submit (one of: {', '.join(sorted(commands))})")


def _option_values(args: list[str]) -> dict[str, str]:
    values = {}
    for i, arg in enumerate(args):
        if arg.startswith("--") and "=" in arg:
            name, value = arg.split("=", 1)
            values[name] = value
        elif arg.startswith("--") and i + 1 < len(args):
            values[arg] = args[i + 1]
    return values


def path_notes(args: list[str]) -> list[str]:
    """Warnings about paths in the command: they are paths on the cluster, and a relative one lands
    in the job's copy of the working directory, which Ray unpacks on the head node, shares between
    jobs with the same code and deletes when it needs the space."""
    values = _option_values(args)
    notes = []
    if args and args[0] in ("search", "retrain") and "--out" not in values:
        notes.append(f"`{args[0]}` without --out writes its results inside the job's temporary working directory "
                     "on the head node; pass --out on storage you can read afterwards")
    for option in ("--data", "--out", "--storage"):
        value = values.get(option)
        if value and "://" not in value and not Path(value).is_absolute():
            notes.append(f"{option} {value}: a relative path resolves inside the job's temporary working directory on "
                         "the cluster (data/ and results/ are not shipped); give a path all nodes share")
    return notes


def kept_back(environ: Mapping[str, str]) -> list[str]:
    return [name for name in KEPT_BACK_ENV if environ.get(name)]


def submit(cluster: Cluster, args: list[str], working_dir: Path | None, job_id: str | None,
           environ: Mapping[str, str] = os.environ) -> str:
    if working_dir is not None and not Path(working_dir).is_dir():
        raise SubmitError(f"--working-dir {working_dir}: not a directory")
    with cluster.requests():
        return cluster.client.submit_job(
            entrypoint=entrypoint(args), runtime_env=runtime_env(working_dir, environ), submission_id=job_id,
            metadata={"submitted_by": SUBMITTED_BY, "command": shlex.join(["defect-tune", *args])},
        )


def info(cluster: Cluster, job_id: str):
    with cluster.requests(job_id):
        return cluster.client.get_job_info(job_id)


def logs(cluster: Cluster, job_id: str) -> str:
    with cluster.requests(job_id):
        return cluster.client.get_job_logs(job_id)


def list_jobs(cluster: Cluster, everything: bool = False) -> list:
    with cluster.requests():
        jobs = cluster.client.list_jobs()
    if not everything:
        jobs = [j for j in jobs if (j.metadata or {}).get("submitted_by") == SUBMITTED_BY]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def wait(cluster: Cluster, job_id: str, timeout: float, poll: float = 1.0):
    """The job's details once it has ended, or as they are after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        details = info(cluster, job_id)
        if str(details.status) in TERMINAL or time.monotonic() > deadline:
            return details
        time.sleep(poll)


def follow(cluster: Cluster, job_id: str, write: Callable[[str], None]):
    """Stream the job's output through `write` until the job ends; return its final details."""

    async def tail() -> None:
        async for chunk in cluster.client.tail_job_logs(job_id):
            write(chunk)

    with cluster.requests(job_id):
        asyncio.run(tail())
    return wait(cluster, job_id, timeout=30)  # the stream closes as the job ends; its status may lag


def stop(cluster: Cluster, job_id: str) -> bool:
    """Ask the job to stop (SIGTERM to its driver, SIGKILL a few seconds later); False if it had ended."""
    with cluster.requests(job_id):
        return cluster.client.stop_job(job_id)


def describe(details) -> str:
    """One line: id, status, when, and Ray's message (for a failed job its first line, with the exit
    code, and the last line of the job's output, usually the error)."""
    when = ""
    if details.start_time:
        start = dt.datetime.fromtimestamp(details.start_time / 1000, dt.UTC)
        when = f" started {start:%Y-%m-%d %H:%M:%S} UTC"
        if details.end_time:
            when += f", ran {(details.end_time - details.start_time) / 1000:.0f} s"
    lines = [line.strip() for line in (details.message or "").strip().splitlines() if line.strip()]
    message = lines[0] + (f" ... {lines[-1]}" if len(lines) > 1 else "") if lines else ""
    return f"{details.submission_id or details.job_id} {details.status}{when}" + (f": {message}" if message else "")
