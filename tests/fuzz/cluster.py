"""The cluster under fuzz: real processes on 127.0.0.1 (``banaserve up``'s ``LocalCluster``:
Redis, a kvstore node, the router, a prefill and a decode worker on tiny-llama, both data planes
over TCP), what the fuzzer learns from its answers, and the checks run after each service's fuzz.

``Opened`` remembers what the fuzzer's own calls opened on the servers (decode reservations,
kvstore pins and reservations) so that later inputs can name them (hints) and so that the
fuzzer, like any well-behaved client, releases them: after every input once more than
``MAX_OPEN`` are open, and all of them before the leak check. A leak is then anything still
held that nobody holds a handle to.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.client.client import BanaServeClient
from services.common.hashing import block_hashes
from services.launcher import ClusterSpec, LocalCluster
from services.rpc.gen.banaserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    kvstore_pb2,
    kvstore_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from tests.fuzz.dataplanes import DataPlaneCaller
from tests.fuzz.harness import Call, Fuzzer, Method, Outcome

MAX_OPEN = 6
NUM_KV_BLOCKS = 256
# Prompts the hints reuse, so that reservations, layouts and transfers can match each other.
PROMPTS = (tuple(range(5, 12)), tuple(range(100, 140)), (7,) * 33)
REFERENCE_PROMPT = list(range(5, 40))
GREEDY = common_pb2.SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
_OPTIONS = [
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.max_receive_message_length", 256 << 20),
]


@dataclass(frozen=True)
class ModelFacts:
    fingerprint: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    vocab_size: int

    @property
    def block_bytes(self) -> int:
        """K and V of one block of one layer, float32."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * 4

    def num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def layout(self, prompt: tuple[int, ...]) -> common_pb2.KVLayout:
        return common_pb2.KVLayout(
            fingerprint=self.fingerprint,
            num_tokens=len(prompt),
            block_hashes=block_hashes(prompt, self.block_size, self.fingerprint),
            dtype=common_pb2.DTYPE_FLOAT32,
            block_size=self.block_size,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            num_layers=self.num_layers,
        )


@dataclass
class Opened:
    """What the fuzzer's calls opened (module docstring)."""

    # request id -> (reservation id, prompt)
    decode: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    pins: list[int] = field(default_factory=list)
    # reservation id -> (hashes to write, num_layers, layer_bytes)
    kv_reservations: dict[int, tuple[list[bytes], int, int]] = field(default_factory=dict)
    kv_hashes: list[bytes] = field(default_factory=list)

    def decode_ids(self) -> list[str]:
        return list(self.decode)

    def reservation_ids(self) -> list[str]:
        return [r for r, _ in self.decode.values()]


class FuzzCluster:
    def __init__(self, home: Path, log_path: Path) -> None:
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        spec = ClusterSpec(
            num_kv_blocks=NUM_KV_BLOCKS,
            kvstore_transport="tcp",
            kv_transport="tcp",
            extra_env={"BANASERVE_HOME": str(home)},
        )
        self.cluster = LocalCluster(spec, self._log)
        self.opened = Opened()
        self.data_plane = DataPlaneCaller()
        self.channels: dict[str, grpc.Channel] = {}
        self._handoffs = itertools.count()

    def start(self, model_dir: Path) -> None:
        self.cluster.start()
        for name in ("router", "prefill-0", "decode-0", "kvstore-0"):
            self.channels[name] = grpc.insecure_channel(self.address(name), options=_OPTIONS)
        self.router = router_pb2_grpc.RouterServiceStub(self.channels["router"])
        self.prefill = prefill_pb2_grpc.PrefillServiceStub(self.channels["prefill-0"])
        self.decode = decode_pb2_grpc.DecodeServiceStub(self.channels["decode-0"])
        self.kvstore = kvstore_pb2_grpc.KVStoreServiceStub(self.channels["kvstore-0"])
        workers = self.router.ListWorkers(router_pb2.ListWorkersRequest(), timeout=10).workers
        self.worker_ids = {w.info.role: w.info.worker_id for w in workers}
        config = json.loads((model_dir / "config.json").read_text())
        self.model = ModelFacts(
            fingerprint=workers[0].info.fingerprint,
            num_layers=config["num_hidden_layers"],
            num_kv_heads=config["num_key_value_heads"],
            head_dim=config["head_dim"],
            block_size=workers[0].info.block_size,
            vocab_size=config["vocab_size"],
        )
        reply = self.decode.ReserveKV(
            decode_pb2.ReserveKVRequest(request_id="fuzz-setup", prompt_token_ids=[5]), timeout=10
        )
        self.decode.Release(decode_pb2.ReleaseRequest(request_id="fuzz-setup"), timeout=10)
        self.decode_data = reply.data_address
        nodes = self.kvstore.Lookup(kvstore_pb2.LookupRequest(), timeout=10).nodes
        self.kvstore_data = nodes[0].data_address
        self.reference = self.generate_reference()

    def stop(self) -> dict[str, int]:
        for channel in self.channels.values():
            channel.close()
        self.data_plane.close()
        try:
            return self.cluster.stop()
        finally:
            self._log.close()

    def address(self, name: str) -> str:
        return self.cluster.child(name).address

    def alive(self) -> dict[str, bool]:
        return {c.name: c.proc.poll() is None for c in self.cluster.children}

    # -- fuzzing, learning from answers, and letting go ------------------------------------

    def fuzz(self, fuzzer: Fuzzer, channel: str, method: Method, call: Call) -> Outcome:
        """One checked call; what an OK answer opened is remembered, the oldest let go."""
        outcome = fuzzer.grpc(self.channels[channel], method, call)
        if outcome.code == "OK":
            self.learn(method.path, call.frames[0] if call.frames else b"", outcome.responses)
        self.trim()
        return outcome

    def reserve(self, prompt: tuple[int, ...]) -> tuple[str, str]:
        """A fresh decode reservation, as the router would make it (released by ``trim``)."""
        request_id = f"handoff-{next(self._handoffs)}"
        request = decode_pb2.ReserveKVRequest(
            request_id=request_id, prompt_token_ids=prompt, sampling=GREEDY
        )
        reply = self.decode.ReserveKV(request, timeout=10)
        self.opened.decode[request_id] = (reply.reservation_id, prompt)
        return request_id, reply.reservation_id

    def learn(self, path: str, request: bytes, responses: list[bytes]) -> None:
        """Remembers what an OK call opened (or closed), by method."""
        learner = _LEARNERS.get(path.lstrip("/"))
        if learner is not None:
            learner(self.opened, request, responses)

    def trim(self, keep: int = MAX_OPEN) -> None:
        """Releases the oldest of what the fuzzer opened, down to ``keep`` of each kind."""
        o = self.opened
        while len(o.decode) > keep:
            request_id = next(iter(o.decode))
            self.decode.Release(decode_pb2.ReleaseRequest(request_id=request_id), timeout=10)
            del o.decode[request_id]
        while len(o.pins) > keep:
            self.kvstore.Unpin(kvstore_pb2.UnpinRequest(pin_id=o.pins.pop(0)), timeout=10)
        while len(o.kv_reservations) > keep:
            reservation_id = next(iter(o.kv_reservations))
            del o.kv_reservations[reservation_id]
            request = kvstore_pb2.KVStoreServiceAbortRequest(reservation_id=reservation_id)
            self.kvstore.Abort(request, timeout=10)
        del o.kv_hashes[: max(0, len(o.kv_hashes) - 64)]

    # -- afterwards ------------------------------------------------------------------------

    def generate_reference(self) -> tuple[int, ...]:
        with BanaServeClient(self.address("router")) as client:
            result = client.complete(
                REFERENCE_PROMPT, temperature=0.0, max_tokens=6, ignore_eos=True, timeout_s=60
            )
        return result.token_ids

    def assert_healthy(self) -> None:
        """Every process runs and answers health SERVING; the two real workers are the ones the
        router routes to; a normal request gets the tokens it got before the fuzz; the kvstore
        stores and returns a block."""
        assert all(self.alive().values()), self.alive()
        for name, channel in self.channels.items():
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        workers = self.router.ListWorkers(router_pb2.ListWorkersRequest(), timeout=10).workers
        assert sorted(w.info.worker_id for w in workers) == sorted(self.worker_ids.values())
        assert {w.state for w in workers} == {router_pb2.WORKER_STATE_ACTIVE}
        assert self.generate_reference() == self.reference
        self.assert_kvstore_round_trip()

    def assert_kvstore_round_trip(self) -> None:
        block = int(time.monotonic_ns()).to_bytes(16, "little")  # a hash nobody else wrote
        data = bytes(range(64))
        reply = self.kvstore.Reserve(
            kvstore_pb2.ReserveRequest(block_hashes=[block], num_layers=1, layer_bytes=64),
            timeout=10,
        )
        assert list(reply.to_write) == [0]
        write = kvstore_pb2.KVDataRequest(
            write=kvstore_pb2.KVDataWrite(
                reservation_id=reply.reservation_id, layer=0, block_hashes=[block]
            )
        )
        assert (
            self.data_plane.call(self.kvstore_data, write.SerializeToString(), data, 10).code
            == "OK"
        )
        commit = kvstore_pb2.CommitRequest(reservation_id=reply.reservation_id)
        assert self.kvstore.Commit(commit, timeout=10).num_committed == 1
        pin = self.kvstore.Pin(kvstore_pb2.PinRequest(block_hashes=[block]), timeout=10)
        assert (pin.num_pinned, pin.layer_bytes) == (1, 64)
        read = kvstore_pb2.KVDataRequest(
            read=kvstore_pb2.KVDataRead(pin_id=pin.pin_id, layer=0, num_blocks=1)
        )
        got = self.data_plane.call(self.kvstore_data, read.SerializeToString(), b"", 10).payload
        self.kvstore.Unpin(kvstore_pb2.UnpinRequest(pin_id=pin.pin_id), timeout=10)
        assert got == data

    def release_all_and_assert_no_leaks(self, within_s: float = 15.0) -> None:
        """Lets go of everything the fuzzer opened, then (polling, bounded: freeing after a
        cancel is asynchronous) every worker and node must hold nothing."""
        self.trim(keep=0)
        self.opened.kv_hashes.clear()
        deadline = time.monotonic() + within_s
        while True:
            held = self.held()
            if not held:
                return
            assert time.monotonic() < deadline, f"held after the fuzz: {held}"
            time.sleep(0.1)

    def held(self) -> dict[str, Any]:
        d = self.decode.Stats(decode_pb2.DecodeServiceStatsRequest(), timeout=10)
        p = self.prefill.Stats(prefill_pb2.PrefillServiceStatsRequest(), timeout=10)
        k = self.kvstore.Stats(kvstore_pb2.KVStoreServiceStatsRequest(), timeout=10)
        held = {
            "decode blocks": d.kv.num_blocks_used,
            "decode running": d.num_running_seqs + d.num_waiting_seqs,
            "decode reservations": len(d.reservations),
            "prefill blocks": p.kv.num_blocks_used,
            "prefill running": p.num_running_seqs,
            "prefill transfers": p.num_open_transfers,
            "prefill queued tokens": p.num_queued_prefill_tokens,
            "kvstore pins": k.num_pins,
            "kvstore reservations": k.num_reservations,
        }
        found: dict[str, Any] = {name: n for name, n in held.items() if n}
        if d.reservations:  # which ones, in which state, for how much longer
            found["decode reservations"] = [
                (r.request_id, decode_pb2.ReservationState.Name(r.state), r.lease_left.seconds)
                for r in d.reservations
            ]
        return found


# -- learners: what an OK answer opened or closed ------------------------------------------


def _reserve_kv(o: Opened, request: bytes, responses: list[bytes]) -> None:
    msg = decode_pb2.ReserveKVRequest.FromString(request)
    reply = decode_pb2.ReserveKVResponse.FromString(responses[0])
    o.decode.pop(msg.request_id, None)
    o.decode[msg.request_id] = (reply.reservation_id, tuple(msg.prompt_token_ids))


def _release(o: Opened, request: bytes, responses: list[bytes]) -> None:
    o.decode.pop(decode_pb2.ReleaseRequest.FromString(request).request_id, None)


def _pin(o: Opened, request: bytes, responses: list[bytes]) -> None:
    pin_id = kvstore_pb2.PinResponse.FromString(responses[0]).pin_id
    if pin_id:
        o.pins.append(pin_id)


def _unpin(o: Opened, request: bytes, responses: list[bytes]) -> None:
    pin_id = kvstore_pb2.UnpinRequest.FromString(request).pin_id
    if pin_id in o.pins:
        o.pins.remove(pin_id)


def _kv_reserve(o: Opened, request: bytes, responses: list[bytes]) -> None:
    msg = kvstore_pb2.ReserveRequest.FromString(request)
    reply = kvstore_pb2.ReserveResponse.FromString(responses[0])
    if reply.reservation_id:
        hashes = [msg.block_hashes[i] for i in reply.to_write]
        o.kv_reservations[reply.reservation_id] = (hashes, msg.num_layers, msg.layer_bytes)
        o.kv_hashes.extend(hashes)


def _kv_end(o: Opened, request: bytes, responses: list[bytes]) -> None:
    # CommitRequest and KVStoreServiceAbortRequest: the same field 1.
    o.kv_reservations.pop(kvstore_pb2.CommitRequest.FromString(request).reservation_id, None)


_LEARNERS: dict[str, Callable[[Opened, bytes, list[bytes]], None]] = {
    "banaserve.v1.DecodeService/ReserveKV": _reserve_kv,
    "banaserve.v1.DecodeService/Release": _release,
    "banaserve.v1.KVStoreService/Pin": _pin,
    "banaserve.v1.KVStoreService/Unpin": _unpin,
    "banaserve.v1.KVStoreService/Reserve": _kv_reserve,
    "banaserve.v1.KVStoreService/Commit": _kv_end,
    "banaserve.v1.KVStoreService/Abort": _kv_end,
}
