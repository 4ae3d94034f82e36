"""The checked-in gRPC stubs match the protos, import, and expose the expected services."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from pqmesh import protogen

REPO_ROOT = Path(protogen.__file__).resolve().parents[1]
STALE = "stubs are stale: run `make proto`"

SERVICES = {
    "pqmesh.api.stage.v1.stage_pb2": {
        "StageService": ["LoadShard", "Forward", "Release", "GetInfo"],
    },
    "pqmesh.api.coordinator.v1.coordinator_pb2": {
        "CoordinatorService": ["SubmitJob", "WatchJob", "GetResults", "ListJobs", "CancelJob", "CreateJob",
                           "AppendPrompts", "StartJob", "StreamResults", "ReplanMesh"],
    },
    "pqmesh.api.planner.v1.planner_pb2": {
        "PlannerService": ["RegisterDevice", "ListDevices", "GetDevice", "Plan", "WhatIf", "PlanReplicas"],
    },
    "pqmesh.api.common.v1.tensor_pb2": {},
}


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("stubs")
    return out, protogen.generate(out)


def test_checked_in_stubs_are_current(regenerated):
    out, files = regenerated
    assert files, "protogen generated nothing"
    for path in files:
        rel = path.relative_to(out)
        checked_in = REPO_ROOT / rel
        assert checked_in.is_file(), f"{rel} is missing: {STALE}"
        assert checked_in.read_bytes() == path.read_bytes(), f"{rel} differs: {STALE}"


def test_no_stubs_left_from_deleted_protos(regenerated):
    out, files = regenerated
    generated = {path.relative_to(out) for path in files}
    checked_in = {
        path.relative_to(REPO_ROOT)
        for suffix in protogen.GENERATED_SUFFIXES
        for path in (REPO_ROOT / "pqmesh").rglob(f"*{suffix}")
    }
    assert checked_in <= generated, f"{sorted(map(str, checked_in - generated))}: {STALE}"


def test_every_proto_is_versioned_by_folder_and_package():
    for rel in protogen.proto_files():
        parts = rel.parts
        assert len(parts) == 4 and parts[0] == "pqmesh" and parts[2] == "v1", rel
        text = (protogen.PROTO_ROOT / rel).read_text()
        assert f"package pqmesh.{parts[1]}.v1;" in text, rel


def test_generated_packages_have_init_files(regenerated):
    out, files = regenerated
    for path in files:
        if path.suffix == ".py" and path.name != "__init__.py":
            assert (path.parent / "__init__.py") in files


@pytest.mark.parametrize("module_name", sorted(SERVICES))
def test_stubs_import_and_expose_services(module_name):
    pb2 = importlib.import_module(module_name)
    services = {
        name: [method.name for method in service.methods]
        for name, service in pb2.DESCRIPTOR.services_by_name.items()
    }
    assert services == SERVICES[module_name]
    grpc_module = importlib.import_module(module_name + "_grpc")
    for name in services:
        assert hasattr(grpc_module, f"{name}Stub")
        assert hasattr(grpc_module, f"{name}Servicer")
        assert hasattr(grpc_module, f"add_{name}Servicer_to_server")


def test_enums_start_unspecified():
    for module_name in SERVICES:
        pb2 = importlib.import_module(module_name)
        for enum in pb2.DESCRIPTOR.enum_types_by_name.values():
            zero = enum.values_by_number[0]
            assert zero.name.endswith("_UNSPECIFIED"), f"{enum.full_name}: {zero.name}"


def test_forward_stream_types():
    from pqmesh.api.stage.v1 import stage_pb2

    method = stage_pb2.DESCRIPTOR.services_by_name["StageService"].methods_by_name["Forward"]
    assert method.client_streaming and method.server_streaming
    request = stage_pb2.ForwardRequest(chunk={"name": "x", "data": b"ab"})
    assert request.WhichOneof("item") == "chunk"
    assert stage_pb2.ForwardRequest.DESCRIPTOR.oneofs_by_name["item"].fields[0].name == "header"
