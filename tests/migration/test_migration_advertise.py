"""A worker's migration data plane behind something that forwards it (a NAT, a proxy): donors
are told ``--advertise-migration-data``, the plane binds ``--migration-data-port`` (docs/services.md,
"Where peers reach a worker")."""

from __future__ import annotations

import asyncio
import importlib

import pytest

from services.migration.agent import MigrationAgent
from services.rpc.dataplane import connect


def test_the_migration_data_plane_announces_the_advertised_address_and_serves_the_bound_one():
    async def main():
        agent = MigrationAgent(lambda fn: None, lambda: None, data_kind="tcp")
        try:
            told = await agent.serve_data("127.0.0.1", 0, "10.0.0.7:7000")
            assert told == agent.data_address == "10.0.0.7:7000"
            client = await connect("tcp", agent._data_server.address, timeout_s=5)  # bound
            await client.close()
            plain = MigrationAgent(lambda fn: None, lambda: None, data_kind="tcp")
            bound = await plain.serve_data("127.0.0.1")
            assert bound == plain._data_server.address  # without: the address it binds
            await plain.close()
        finally:
            await agent.close()

    asyncio.run(main())


@pytest.mark.parametrize("service", ["prefill", "decode"])
def test_the_migration_data_flags_are_checked_when_parsed(service, capsys):
    parse_args = importlib.import_module(f"services.{service}.__main__").parse_args
    args = parse_args(["--migration-data-port", "7001", "--advertise-migration-data", "h:7000"])
    assert (args.migration_data_port, args.advertise_migration_data) == (7001, "h:7000")
    for flag, bad in (("--migration-data-port", "70000"), ("--advertise-migration-data", "h")):
        with pytest.raises(SystemExit):
            parse_args([flag, bad])
        assert f"argument {flag}:" in capsys.readouterr().err
