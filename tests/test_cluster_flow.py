"""README's "run on a cluster" flow, for real: `ray start --head` with token authentication (as ray_cluster.yaml
starts the head), then `ray job submit` from a client that holds only the token, of the tokenize job and of a
training app on the shards it wrote, both on object storage.

The head: `ray get-auth-token --generate` writes its token to HOME/.ray/auth_token, and `ray start --head --block`
runs with RAY_AUTH_MODE=token and the virtualenv's bin first on PATH (the job drivers inherit that environment, so
the entrypoint `videopoet` is found), in a HOME and a `--temp-dir` of its own on free ports: it never touches the
user's ~/.ray or /tmp/ray, nor another Ray on this machine. It is stopped by killing its own processes (the tree
under its `ray start --block`, and its session), never by `ray stop`, which stops every Ray on the machine. Its
environment also holds the S3 endpoint and credentials, as a node's instance role would.

The client: a HOME with nothing but .ray/auth_token, RAY_AUTH_MODE=token, and PATH=/usr/bin:/bin: no virtualenv,
no `videopoet`, no cloud credentials. Its `ray` is the virtualenv's `ray` script called by its full path (the Ray
CLI of the cluster's Ray version is all a client needs).
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pyarrow.fs as pa_fs
import pytest

from servers import free_ports

README = Path(__file__).resolve().parents[1] / "README.md"
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
SYSTEM_PATH = "/usr/bin:/bin"  # sh, ffmpeg; nothing of the virtualenv


def wait_for_job_server(address, token, proc, log, timeout=120):
    request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"no job server at {address} after {timeout} s:\n{log.read_text()[-3000:]}")


def own_processes(proc):
    """The head's processes: the tree under its `ray start --block` and anything left in its session."""
    found = {}
    try:
        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            found[p.pid] = p
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid:
                found[p.pid] = p
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass
    return list(found.values())


@pytest.fixture
def head(tmp_path, s3_env):
    """A token-authenticated head on 127.0.0.1: (job server address, the token file a client copies)."""
    home = tmp_path / "head-home"
    home.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="vp-ray-")  # short: Ray's socket paths must stay under 108 characters
    env = {"HOME": str(home), "PATH": f"{VENV_BIN}:{SYSTEM_PATH}", "LANG": "C.UTF-8", "RAY_AUTH_MODE": "token",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1", **s3_env}
    token = subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, text=True,
                           check=True, timeout=120).stdout.strip()
    token_file = home / ".ray" / "auth_token"
    assert token and token_file.read_text().strip() == token

    gcs, dashboard, client, agent, agent_grpc, metrics, runtime_env, node_manager, object_manager = free_ports(9)
    log = tmp_path / "head.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
             "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
             "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
             "--runtime-env-agent-port", str(runtime_env), "--node-manager-port", str(node_manager),
             "--object-manager-port", str(object_manager), "--num-cpus", "2",
             "--object-store-memory", str(400 * 2 ** 20), "--temp-dir", temp_dir, "--disable-usage-stats"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_job_server(address, token, proc, log)
        yield address, token_file
    finally:
        # SIGKILL to every process of this node: a graceful stop waits up to 30 s on its workers, and the node's state
        # (its --temp-dir) goes with it.
        processes = own_processes(proc)
        for p in processes:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=30)
        psutil.wait_procs(processes, timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def client_home(root, token_file=None):
    root.mkdir()
    if token_file is not None:
        (root / ".ray").mkdir()
        shutil.copy(token_file, root / ".ray" / "auth_token")
    return root


def client_env(home, **extra):
    return {"HOME": str(home), "PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "RAY_AUTH_MODE": "token", **extra}


def submit(address, env, *entrypoint):
    """`ray job submit` as README writes it; it waits for the job and exits 0 only if it SUCCEEDED."""
    proc = subprocess.run([RAY, "job", "submit", "--address", address, "--log-style", "record", "--", *entrypoint],
                          env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture
def corpus_and_tokenizers(tmp_path):
    """A 6-clip synthetic corpus and random debug tokenizers, on a path the head shares with the client."""
    from pipeline.checkpoint import save_checkpoint
    from pipeline.config import load_config
    from pipeline.magvit import MagvitConfig, MagvitModel
    from pipeline.quantizers import RVQConfig
    from pipeline.soundstream import SoundStreamConfig, SoundStreamModel
    from pipeline.synth import SynthConfig, write_corpus

    root = tmp_path / "shared"
    write_corpus(root / "corpus", SynthConfig(width=48, height=32, fps=8, frames=17), 6, seed=0)
    video = load_config(MagvitConfig, "debug", kind="video_tokenizer")
    save_checkpoint(root / "video", MagvitModel(video), video)
    audio = SoundStreamConfig(channels=4, latent_dim=8, quantizer=RVQConfig(levels=2, codebook_size=16))
    save_checkpoint(root / "audio", SoundStreamModel(audio), audio)
    return root


def test_readme_cluster_section_submits_parsable_jobs_with_the_token():
    from test_cli import parser_of

    text = README.read_text()
    section = text[text.index("## For platform teams: run on a cluster"):text.index("### Security notes")]
    lines = [line.split("  #")[0].strip() for line in section.replace("\\\n", " ").splitlines()]
    assert "export RAY_AUTH_MODE=token" in lines and "ray get-auth-token --generate" in lines
    submits = [line for line in lines if line.startswith("ray job submit ")]
    entrypoints = [shlex.split(line.split(" -- ", 1)[1]) for line in submits]
    assert [e[:2] for e in entrypoints] == [["videopoet", "tokenize"], ["videopoet", "train"]]
    for entrypoint in entrypoints:
        parser, args = parser_of(entrypoint)
        parser.parse_args(args)


@pytest.mark.heavy
def test_jobs_submitted_with_only_the_token_run_on_the_cluster(head, corpus_and_tokenizers, s3_env, tmp_path):
    address, token_file = head
    shared = corpus_and_tokenizers
    assert shutil.which("videopoet", path=SYSTEM_PATH) is None  # the client has no videopoet of its own

    # Without the token, or without RAY_AUTH_MODE=token (the CLI then sends no token), nothing runs. Ray's CLI
    # answers with a traceback whose last line names the cause and where the token goes.
    code, output = submit(address, client_env(client_home(tmp_path / "no-token")), "echo", "ran")
    assert code != 0 and "ran\n" not in output
    last = output.strip().splitlines()[-1]
    assert last.startswith("ray.exceptions.AuthenticationError") and "~/.ray/auth_token" in last
    home = client_home(tmp_path / "client", token_file)
    no_mode = {k: v for k, v in client_env(home).items() if k != "RAY_AUTH_MODE"}
    code, output = submit(address, no_mode, "echo", "ran")
    assert code != 0 and "Missing authentication token" in output and "RAY_AUTH_MODE is currently 'disabled'" in output
    code, output = submit(address, client_env(home, RAY_AUTH_TOKEN="0" * 64), "echo", "ran")
    assert code != 0 and "Invalid authentication token" in output

    # With the token: the tokenize job, then the LLM on its shards, outputs in the bucket.
    env = client_env(home)
    code, output = submit(address, env, "videopoet", "tokenize", "--manifest", str(shared / "corpus/manifest.jsonl"),
                          "--out", "s3://bucket/tokens", "--video-tokenizer", str(shared / "video"),
                          "--audio-tokenizer", str(shared / "audio"), "--config", "debug")
    assert code == 0 and "succeeded" in output, output[-5000:]
    mlflow_db = shared / "mlflow.db"
    code, output = submit(address, env, "videopoet", "train", "llm", "--config", "debug", "--data", "s3://bucket/tokens",
                          "--out", "s3://bucket/runs/llm", "--steps", "2", "--workers", "1", "--quiet",
                          "--set", "mixture.weights={text_to_video = 1.0}",
                          "--set", f"tracking.uri=sqlite:///{mlflow_db}")
    assert code == 0 and "succeeded" in output, output[-5000:]

    s3 = pa_fs.S3FileSystem(endpoint_override=s3_env["AWS_ENDPOINT_URL_S3"], access_key="testing",
                            secret_key="testing", region="us-east-1")
    shard_files = [i for i in s3.get_file_info(pa_fs.FileSelector("bucket/tokens", recursive=True))
                   if i.path.endswith(".parquet") and "/shard-" in i.path]
    assert shard_files
    summary = json.loads(s3.open_input_stream("bucket/runs/llm/summary.json").read())
    assert summary["steps"] == 2 and summary["model"] == "s3://bucket/runs/llm/model"
    names = {i.base_name for i in s3.get_file_info(pa_fs.FileSelector("bucket/runs/llm/model"))}
    assert {"model.safetensors", "config.json", "words.json"} <= names

    from pipeline.tracking import search_runs

    (run,) = search_runs(f"sqlite:///{mlflow_db}", "videopoet")
    assert run.data.metrics["loss"] > 0
