"""The committed generated code is exactly what scripts/gen_protos.py makes from protos/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh(tmp_path):
    written = _generator().generate(tmp_path)
    assert written, "the generator produced nothing"
    fresh = {p.relative_to(tmp_path) for p in (tmp_path / "rtdiff_cluster" / "proto").rglob("*.py*")}
    committed = {p.relative_to(REPO) for p in (REPO / "rtdiff_cluster" / "proto").rglob("*.py*")
                 if "__pycache__" not in p.parts}
    assert fresh == committed, f"files differ: {sorted(map(str, fresh ^ committed))}; run scripts/gen_protos.py"
    for rel in fresh:
        assert (tmp_path / rel).read_bytes() == (REPO / rel).read_bytes(), f"{rel} is stale; run scripts/gen_protos.py"


def test_service_is_versioned():
    from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb

    assert pb.DESCRIPTOR.package == "rtdiff.v1"
    assert set(pb.DESCRIPTOR.services_by_name["Diffusion"].methods_by_name) == {"Generate", "StreamGenerate", "ListModels"}
