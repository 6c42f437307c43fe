"""``banaserve up --mode``: each mode's cluster spec and the processes it runs (pure; the
processes of a colocated cluster: tests/e2e/test_up_modes.py)."""

from __future__ import annotations

import argparse

import pytest

from services.common.errors import ConfigError
from services.decode.__main__ import parse_args as decode_args
from services.launcher import (
    BANASERVE_SERVICE_ARGS,
    ClusterSpec,
    LocalCluster,
    Mode,
    mode_spec,
    process_names,
)
from services.router.__main__ import parse_args as router_args
from services.up import add_arguments, cluster_spec


@pytest.mark.parametrize(
    "mode, workers, prefill, expected",
    [
        (Mode.COLOCATED, 2, None, ["router", "mixed-0", "mixed-1"]),
        (Mode.COLOCATED, 1, None, ["router", "mixed-0"]),
        (Mode.STATIC_PD, 2, None, ["router", "prefill-0", "decode-0"]),
        (Mode.STATIC_PD, 5, None, ["router", "prefill-0", "prefill-1", *(f"decode-{i}" for i in range(3))]),
        (Mode.STATIC_PD, 4, 1, ["router", "prefill-0", "decode-0", "decode-1", "decode-2"]),
        (
            Mode.BANASERVE,
            2,
            None,
            ["redis", "kvstore-0", "router", "prefill-0", "decode-0", "coordinator"],
        ),
    ],
)  # fmt: skip
def test_each_mode_runs_its_process_set(mode, workers, prefill, expected):
    assert process_names(mode_spec(mode, workers, prefill)) == expected


def test_what_each_mode_decides():
    colocated = mode_spec(Mode.COLOCATED, 2)
    assert (colocated.policy, colocated.num_kvstore, colocated.coordinator) == (
        "colocated",
        0,
        False,
    )
    static = mode_spec(Mode.STATIC_PD, 2)
    assert (static.policy, static.num_kvstore, static.coordinator) == ("load", 0, False)
    assert static.service_args == {}
    given = {"coordinator": ("--gap-high", "0.3"), "decode": ("--max-num-batched-tokens", "32"),
             "prefill": ("--max-num-seqs", "8")}  # fmt: skip
    bana = mode_spec(Mode.BANASERVE, 2, service_args=given)
    assert (bana.policy, bana.num_kvstore, bana.coordinator) == ("load", 1, True)
    # banaserve's own flags first, so that a flag given for a service overrides the mode's (the
    # last of a flag wins): its coordinator decides on its own, its router lets the decode
    # worker prefill (conditional disaggregation) in chunks its decode worker bounds, smaller
    # in a step that also decodes
    assert bana.service_args == {
        "coordinator": ("--auto", "--gap-high", "0.3"),
        "router": ("--local-prefill-max-tokens", "128", "--local-prefill-queue-tokens", "1280"),
        "decode": (*BANASERVE_SERVICE_ARGS["decode"], "--max-num-batched-tokens", "32"),
        "prefill": ("--max-num-seqs", "8"),
    }
    # ... and the services' own parsers read them so
    assert decode_args(list(bana.service_args["decode"])).max_num_batched_tokens == 32
    router = router_args(list(bana.service_args["router"]))
    assert (router.local_prefill_max_tokens, router.local_prefill_queue_tokens) == (128, 1280)
    alone = decode_args(list(mode_spec(Mode.BANASERVE).service_args["decode"]))
    assert (alone.max_num_batched_tokens, alone.max_prefill_tokens_while_decoding) == (64, 0)


def test_the_rest_of_the_spec_is_the_same_in_every_mode():
    specs = [mode_spec(m, 2, model="smollm2-135m", threads=1, pin=True) for m in Mode]
    assert {(s.model, s.threads, s.pin) for s in specs} == {("smollm2-135m", 1, True)}


@pytest.mark.parametrize(
    "mode, workers, prefill, fields, message",
    [
        (Mode.STATIC_PD, 1, None, {}, "needs more workers"),
        (Mode.COLOCATED, 0, None, {}, "needs more workers"),
        (Mode.BANASERVE, 2, 2, {}, "leave one to decode"),
        (Mode.STATIC_PD, 2, None, {"num_kvstore": 1}, "decides num_kvstore"),
        (Mode.COLOCATED, 2, None, {"policy": "load"}, "decides policy"),
    ],
)
def test_bad_mode_requests_are_refused(mode, workers, prefill, fields, message):
    with pytest.raises(ConfigError, match=message):
        mode_spec(mode, workers, prefill, **fields)


def test_up_flags_pick_the_mode():
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert cluster_spec(p.parse_args(["--mode", "static-pd", "--workers", "3"])) == mode_spec(
        Mode.STATIC_PD, 3
    )
    # Without --mode the flags stand as before: 1 prefill, 1 decode, a store, no coordinator.
    plain = cluster_spec(p.parse_args([]))
    assert process_names(plain) == ["redis", "kvstore-0", "router", "prefill-0", "decode-0"]
    assert plain == ClusterSpec()


def test_coordinator_args_reach_the_automatic_coordinator():
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(
        ["--mode", "banaserve", "--coordinator-args", "--gap-high 0.3 --sustain-s 1"]
    )
    assert cluster_spec(args).service_args["coordinator"] == (
        "--auto", "--gap-high", "0.3", "--sustain-s", "1"
    )  # fmt: skip


@pytest.mark.parametrize(
    ("flag", "value", "field", "parsed", "bad", "refusal"),
    [
        ("--store-write-back-delay", "0", "store_write_back_delay_s", 0.0, (-1.0, float("nan")),
         "write-back delay must be >= 0"),
        ("--store-write-policy", "all", "store_write_policy", "all", ("some",),
         "write policy must be"),
    ],
)  # fmt: skip
def test_a_store_flag_of_up_reaches_only_store_using_prefill_workers(
    monkeypatch, flag, value, field, parsed, bad, refusal
):
    p = argparse.ArgumentParser()
    add_arguments(p)
    spec = cluster_spec(p.parse_args(["--mode", "banaserve", flag, value]))
    assert getattr(spec, field) == parsed
    assert getattr(cluster_spec(p.parse_args(["--mode", "banaserve"])), field) is None
    cluster = LocalCluster(spec)
    spawned: dict[str, list[str]] = {}
    monkeypatch.setattr(cluster, "_worker_args", lambda: [])
    monkeypatch.setattr(
        cluster, "_spawn", lambda name, module, args: spawned.setdefault(name, args)
    )
    cluster._spawn_workers("127.0.0.1:1")
    assert spawned["prefill-0"][-2:] == [flag, str(parsed)]
    for name, args in spawned.items():  # each registers under the name `up` prints
        assert args[:2] == ["--worker-id", name]
    assert flag not in spawned["decode-0"]
    spawned.clear()
    cluster._spawn_workers(None)  # no store: nothing to write back
    assert flag not in spawned["prefill-0"]
    for value in bad:
        with pytest.raises(ConfigError, match=refusal):
            ClusterSpec(**{field: value})


def test_an_unknown_store_write_policy_is_refused_by_up():
    p = argparse.ArgumentParser()
    add_arguments(p)
    with pytest.raises(SystemExit):
        p.parse_args(["--store-write-policy", "some"])


def test_prefill_and_decode_args_become_the_flags_of_their_module():
    p = argparse.ArgumentParser()
    add_arguments(p)
    argv = ["--mode", "banaserve", "--prefill-args", "--max-num-batched-tokens 512",
            "--decode-args", "--max-num-seqs 64", "--coordinator-args", "--gap-high 0.3",
            "--router-args", "--local-prefill-max-tokens 64"]  # fmt: skip
    spec = cluster_spec(p.parse_args(argv))
    mine = BANASERVE_SERVICE_ARGS
    assert spec.service_args == {
        "coordinator": ("--auto", "--gap-high", "0.3"),
        "router": (*mine["router"], "--local-prefill-max-tokens", "64"),
        "prefill": ("--max-num-batched-tokens", "512"),
        "decode": (*mine["decode"], "--max-num-seqs", "64"),
    }
    # ``LocalCluster._spawn`` appends service_args by module: mixed workers are decode's.
    colocated = cluster_spec(
        p.parse_args(["--mode", "colocated", "--decode-args", "--max-num-seqs 8"])
    )
    assert colocated.service_args == {"decode": ("--max-num-seqs", "8")}
    assert cluster_spec(p.parse_args(["--mode", "static-pd"])).service_args == {}
