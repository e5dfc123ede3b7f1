import os
import urllib.request

import pytest

from cluster import local_ray_env

local_ray_env()  # for every Ray this session starts: its own, the apps', and `ray start` and benchmark subprocesses


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the session's Ray Data and Ray Train tests."""
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def s3_env():
    """An S3 server on 127.0.0.1 (moto) with a bucket named `bucket`, and the environment a user would set to reach
    it (for a subprocess, or the `s3` fixture for this one)."""
    import pyarrow.fs as pa_fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    # moto keeps its buckets in process-wide state that outlives a server: start from none
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).close()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL_S3": endpoint}
    pa_fs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL_S3"], access_key="testing", secret_key="testing",
                       region="us-east-1", allow_bucket_creation=True).create_dir("bucket")
    yield env
    server.stop()


@pytest.fixture
def tracking_server(tmp_path):
    """`mlflow server` with its store in tmp_path/server (`servers.mlflow_server`): its URI and process group."""
    from servers import mlflow_server

    with mlflow_server(tmp_path / "server") as server:
        yield server


@pytest.fixture
def s3(s3_env, monkeypatch):
    """The `s3_env` server with its environment set in this process; a filesystem on it."""
    import pyarrow.fs as pa_fs

    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    return pa_fs.S3FileSystem(endpoint_override=s3_env["AWS_ENDPOINT_URL_S3"], allow_bucket_creation=True)


@pytest.fixture
def trained_straight_and_resumed(tmp_path):
    """`run(main, argv, killed=None)`: trains to step 4 straight and to step 2 then resumed to 4 (into OUT/straight
    and OUT/resumed), checks that both exports hold the same weights, and returns the resumed run's folder. With
    `killed` (the app's Ray Train run name), a worker of the resumed run is SIGKILLed and Ray Train restarts the group
    from the step-2 checkpoint (`train.max_failures = 1`), which must change nothing."""
    import torch
    from safetensors.torch import load_file

    from workers import run_killing_a_worker

    def run(main, argv, killed=None):
        straight, resumed = tmp_path / "straight", tmp_path / "resumed"
        assert main([*argv, "--out", str(straight), "--steps", "4"]) == 0
        assert main([*argv, "--out", str(resumed), "--steps", "2"]) == 0
        final = [*argv, "--out", str(resumed), "--steps", "4"]
        if killed is None:
            assert main(final) == 0
        else:
            final += ["--set", "train.max_failures=1"]
            run_killing_a_worker(lambda: main(final), resumed / "ray" / killed)
        a = load_file(str(straight / "model" / "model.safetensors"))
        b = load_file(str(resumed / "model" / "model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
        return resumed

    return run


@pytest.fixture(scope="session")
def shards(ray_local, tmp_path_factory):
    """Token shards of a 10-clip synthetic corpus through the debug tokenizers (random weights), for LLM training."""
    # Imported here, so that a run of the light tests does not import the models and the tokenize job.
    from pipeline.checkpoint import save_checkpoint
    from pipeline.config import load_config
    from pipeline.magvit import MagvitConfig, MagvitModel
    from pipeline.quantizers import RVQConfig
    from pipeline.soundstream import SoundStreamConfig, SoundStreamModel
    from pipeline.synth import SynthConfig, write_corpus
    from tokenize_jobs.cli import tokenize

    root = tmp_path_factory.mktemp("llm-data")
    write_corpus(root / "corpus", SynthConfig(width=48, height=32, fps=8, frames=17), 10, seed=0)
    video = load_config(MagvitConfig, "debug", kind="video_tokenizer")
    save_checkpoint(root / "video", MagvitModel(video), video)
    audio = SoundStreamConfig(channels=4, latent_dim=8, quantizer=RVQConfig(levels=2, codebook_size=16))
    save_checkpoint(root / "audio", SoundStreamModel(audio), audio)
    assert tokenize(["--manifest", str(root / "corpus" / "manifest.jsonl"), "--out", str(root / "shards"),
                     "--video-tokenizer", str(root / "video"), "--audio-tokenizer", str(root / "audio"),
                     "--config", "debug"]) == 0
    return root / "shards"


@pytest.fixture(scope="session")
def llm_export(tmp_path_factory):
    """Build a random-init LLM export over random debug tokenizers: `llm_export(captions, media) -> root`, with the
    model in root/run/model as `videopoet train llm` exports it (words, tokenizer record, media settings)."""
    from pipeline.checkpoint import save_checkpoint
    from pipeline.config import load_config, to_dict
    from pipeline.llm import LLMConfig, VideoPoetLM
    from pipeline.magvit import MagvitConfig, MagvitModel
    from pipeline.quantizers import RVQConfig
    from pipeline.soundstream import SoundStreamConfig, SoundStreamModel
    from pipeline.structure import KIND as STRUCTURE_KIND
    from pipeline.text import WordVocabulary
    from pipeline.vocab import Vocabulary

    def build(captions, media):
        root = tmp_path_factory.mktemp("export")
        video = load_config(MagvitConfig, "debug", kind="video_tokenizer")
        save_checkpoint(root / "video", MagvitModel(video), video)
        audio = SoundStreamConfig(channels=4, latent_dim=8, quantizer=RVQConfig(levels=2, codebook_size=16))
        save_checkpoint(root / "audio", SoundStreamModel(audio), audio)
        words = WordVocabulary.build(captions)
        vocab = Vocabulary(video_codes=2 ** video.quantizer.bits, audio_levels=2, audio_codes=16,
                           text_size=words.size)
        cfg = load_config(LLMConfig, "debug", [], kind="llm")
        cfg = LLMConfig(**{**cfg.__dict__, "vocab": vocab})
        tokenizers = {"video": {"location": str(root / "video")}, "audio": {"location": str(root / "audio")}}
        save_checkpoint(root / "run" / "model", VideoPoetLM(cfg), cfg,
                        extra={"tokenizers": tokenizers,
                               "media": {"media": to_dict(media), "hr": False, "structure": STRUCTURE_KIND}})
        words.save(root / "run" / "model" / "words.json")
        return root

    return build

