"""Generate the Python gRPC code for protos/ into rtdiff_cluster/proto/.

Usage: python scripts/gen_protos.py [OUTPUT_ROOT]

The proto root is mapped onto the package path (protoc's VIRTUAL=PHYSICAL include form) so the
generated modules import each other as `rtdiff_cluster.proto.rtdiff.v1...` without sys.path tricks.
The output is deterministic for a given grpcio-tools version, which pyproject pins; the test
tests/test_protos.py regenerates into a temporary folder and compares byte for byte.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"
VIRTUAL_ROOT = "rtdiff_cluster/proto"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(output_root: Path) -> list[Path]:
    """Writes the generated modules under output_root/rtdiff_cluster/proto and returns them."""
    from grpc_tools import protoc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    virtual = [f"{VIRTUAL_ROOT}/{p.relative_to(PROTO_ROOT).as_posix()}" for p in proto_files()]
    args = [
        "protoc",
        f"-I{VIRTUAL_ROOT}={PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={output_root}",
        f"--pyi_out={output_root}",
        f"--grpc_python_out={output_root}",
        *virtual,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    out = output_root / VIRTUAL_ROOT
    written = sorted(p for p in out.rglob("*") if p.suffix in (".py", ".pyi") and "_pb2" in p.name)
    # Package markers so the generated folders import as regular packages.
    for folder in {p.parent for p in written} | {out}:
        while folder != output_root / "rtdiff_cluster" and folder.is_relative_to(out):
            (folder / "__init__.py").touch()
            folder = folder.parent
    return written


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO
    for path in generate(root):
        print(path.relative_to(root))
