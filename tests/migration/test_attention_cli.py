"""``banaserve migrate attention``: its arguments and how ``banaserve migrations`` shows one."""

from __future__ import annotations

import argparse

from services.coordinator.cli import add_migrate_arguments, format_migration, format_row
from services.rpc.gen.banaserve.v1 import coordinator_pb2 as pb


def test_migrate_attention_arguments():
    p = argparse.ArgumentParser()
    add_migrate_arguments(p)
    args = p.parse_args(
        [
            "attention",
            "--donor",
            "decode-1",
            "--helper",
            "prefill-2",
            "--max-sequences",
            "2",
            "--max-blocks",
            "5",
            "--request-id",
            "r1",
            "--request-id",
            "r2",
            "--wait",
            "--coordinator",
            "127.0.0.1:1",
        ]
    )
    assert (args.migrate_command, args.donor, args.helper) == ("attention", "decode-1", "prefill-2")
    assert (args.max_sequences, args.max_blocks, args.request_id, args.wait) == (
        2,
        5,
        ["r1", "r2"],
        True,
    )
    assert not args.refill
    refill = ["attention", "--donor", "d", "--helper", "p", "--refill", "--coordinator", "x:1"]
    assert p.parse_args(refill).refill


def test_an_attention_migration_is_shown_with_its_blocks():
    m = pb.Migration(
        migration_id="m-4", kind=pb.MIGRATION_KIND_ATTENTION, state=pb.MIGRATION_STATE_ACTIVE,
        donor="decode-1", helper="prefill-2", start_layer=0, end_layer=4, num_kv_bytes=4096,
        num_blocks=9, num_sequences=2, max_sequences=2,
    )  # fmt: skip
    assert format_row(m) == (
        "m-4    attention ACTIVE         decode-1 -> prefill-2    [0, 4)    kv        4,096 B"
    )
    lines = format_migration(m).splitlines()
    assert lines[0] == "migration   m-4 (attention)"
    assert "blocks      9 KV blocks of the longest 2 attended on the helper" in lines
    m.refill = True
    assert "blocks      9 KV blocks of the longest 2 (refilled) attended on the helper" in (
        format_migration(m).splitlines()
    )
    m.refill = False
    m.request_ids.extend(["r1", "r2"])
    assert "blocks      9 KV blocks of r1, r2 attended on the helper" in format_migration(m)
