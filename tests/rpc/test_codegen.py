"""`python -m services.rpc.codegen`: complete, importable, deterministic, and idempotent."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from services.rpc import codegen


def snapshot(root):
    return {
        p.relative_to(root): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in (".py", ".pyi")
    }


def test_generated_modules_import_by_their_full_path():
    from services.rpc.gen.banaserve.v1 import decode_pb2, prefill_pb2, router_pb2, router_pb2_grpc

    services = {
        s.full_name
        for module in (router_pb2, prefill_pb2, decode_pb2)
        for s in module.DESCRIPTOR.services_by_name.values()
    }
    assert services == {
        "banaserve.v1.RouterService",
        "banaserve.v1.PrefillService",
        "banaserve.v1.DecodeService",
    }
    # Descriptors keep their proto paths, which is what reflection and buf see.
    assert router_pb2.DESCRIPTOR.name == "banaserve/v1/router.proto"
    assert hasattr(router_pb2_grpc, "RouterServiceStub")


def test_a_second_run_does_nothing():
    before = snapshot(codegen.GEN_ROOT)
    assert codegen.generate() is False
    assert snapshot(codegen.GEN_ROOT) == before
    assert not codegen.is_stale()


def test_the_command_reports_up_to_date():
    run = subprocess.run(
        [sys.executable, "-m", "services.rpc.codegen"],
        cwd=codegen.REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert run.stderr.strip() == "services/rpc/gen is up to date"


def test_output_is_deterministic_and_every_import_is_rewritten(tmp_path):
    assert codegen.generate(tmp_path / "gen", force=True) is True
    fresh = {rel: content for rel, (content, _) in snapshot(tmp_path / "gen").items()}
    in_tree = {rel: content for rel, (content, _) in snapshot(codegen.GEN_ROOT).items()}
    assert fresh == in_tree
    for rel, content in fresh.items():
        assert b"\nfrom banaserve" not in content and b"\nimport banaserve" not in content, rel


def test_an_edited_proto_regenerates_and_a_removed_one_leaves_nothing_behind(tmp_path):
    protos, out = tmp_path / "protos", tmp_path / "gen"
    shutil.copytree(codegen.PROTO_ROOT, protos)
    assert codegen.generate(out, protos) is True
    assert codegen.generate(out, protos) is False

    (protos / "banaserve/v1/router.proto").unlink()
    (protos / "banaserve/v1/prefill.proto").touch()
    assert codegen.is_stale(out, protos)
    assert codegen.generate(out, protos) is True
    v1 = out / "banaserve/v1"
    assert sorted(p.name for p in v1.glob("router*")) == []
    assert (v1 / "prefill_pb2.py").exists()


def test_rewrite_imports():
    source = "from banaserve.v1 import common_pb2 as _c\nfrom google.protobuf import x\n"
    assert codegen.rewrite_imports(source) == (
        "from services.rpc.gen.banaserve.v1 import common_pb2 as _c\n"
        "from google.protobuf import x\n"
    )
    with pytest.raises(RuntimeError, match="bare"):
        codegen.rewrite_imports("import banaserve.v1.common_pb2\n")
