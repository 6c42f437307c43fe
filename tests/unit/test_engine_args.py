"""One set of engine flags for every worker: prefill and decode parse them alike."""

from __future__ import annotations

import argparse

import pytest

from services.common.config import EngineConfig
from services.common.engine_args import (
    KV_TRANSPORTS,
    add_engine_args,
    add_kv_transport_arg,
    engine_config,
)
from services.common.errors import ConfigError
from services.decode.__main__ import parse_args as decode_args
from services.kvstore.__main__ import parse_args as kvstore_args
from services.launcher import ClusterSpec, LocalCluster
from services.prefill.__main__ import parse_args as prefill_args

FLAGS = [
    "--model", "m", "--dtype", "bfloat16", "--threads", "3", "--block-size", "8",
    "--num-kv-blocks", "40", "--kv-cache-bytes", "4096", "--max-num-seqs", "5",
    "--max-num-batched-tokens", "64", "--max-model-len", "100", "--no-prefix-caching",
    "--kv-transport", "tcp",
]  # fmt: skip
EXPECTED = EngineConfig(
    model="m",
    dtype="bfloat16",
    block_size=8,
    num_kv_blocks=40,
    kv_cache_bytes=4096,
    max_num_seqs=5,
    max_num_batched_tokens=64,
    max_model_len=100,
    enable_prefix_caching=False,
    num_threads=3,
)


@pytest.mark.parametrize("parse", [prefill_args, decode_args], ids=["prefill", "decode"])
def test_every_worker_takes_the_same_engine_flags(parse):
    args = parse(FLAGS)
    assert engine_config(args) == EXPECTED
    assert args.kv_transport == "tcp"


@pytest.mark.parametrize("parse", [prefill_args, decode_args], ids=["prefill", "decode"])
def test_defaults_are_the_engine_configs_and_the_same_transport(parse, monkeypatch):
    monkeypatch.delenv("BANASERVE_MODEL", raising=False)
    args = parse([])
    assert engine_config(args) == EngineConfig(model="tiny-llama", num_threads=1)
    assert args.kv_transport == "ucx"


def test_kv_transport_choices_are_the_data_planes_and_none():
    assert KV_TRANSPORTS == ("ucx", "tcp", "grpc", "none")
    p = argparse.ArgumentParser()
    add_kv_transport_arg(p)
    assert p.parse_args(["--kv-transport", "none"]).kv_transport == "none"
    with pytest.raises(SystemExit):
        p.parse_args(["--kv-transport", "auto"])


def test_inconsistent_flags_fail_as_config_errors():
    p = argparse.ArgumentParser()
    add_engine_args(p)
    args = p.parse_args(["--num-kv-blocks", "4", "--memory-budget-bytes", "1000"])
    with pytest.raises(ConfigError, match="not both"):
        engine_config(args)


def test_device_flag_and_env_reach_the_engine_config_and_are_checked(monkeypatch):
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_config(p.parse_args([])).device == "cpu"
    assert engine_config(p.parse_args(["--device", "cuda:1"])).device == "cuda:1"
    monkeypatch.setenv("BANASERVE_DEVICE", "cuda")
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_config(p.parse_args([])).device == "cuda"
    with pytest.raises(ConfigError, match="device must be cpu, cuda or cuda:N, got 'gpu'"):
        engine_config(p.parse_args(["--device", "gpu"]))


def test_up_passes_the_kv_transport_to_prefill_and_decode_workers(monkeypatch):
    router = argparse.Namespace(address="127.0.0.1:1")
    monkeypatch.setattr(LocalCluster, "router", property(lambda self: router))
    monkeypatch.setattr(LocalCluster, "_spawn", lambda self, name, module, args: (name, args))
    cluster = LocalCluster(ClusterSpec(kv_transport="tcp", num_mixed=1, num_kvstore=0))
    workers = dict(cluster._spawn_workers(None))
    assert sorted(workers) == ["decode-0", "mixed-0", "prefill-0"]
    for args in workers.values():
        assert args[args.index("--kv-transport") + 1] == "tcp"


def test_the_store_flags_parse_and_bad_values_are_refused():
    assert prefill_args([]).store_write_policy == "reused"
    assert prefill_args(["--store-write-policy", "all"]).store_write_policy == "all"
    assert kvstore_args([]).seen_window == 600.0
    assert kvstore_args(["--seen-window", "30"]).seen_window == 30.0
    for parse, argv in (
        (prefill_args, ["--store-write-policy", "some"]),
        (kvstore_args, ["--seen-window", "0"]),
        (kvstore_args, ["--seen-window", "nan"]),
    ):
        with pytest.raises(SystemExit):
            parse(argv)
