"""deploy/Dockerfile, checked statically against the code: no Docker engine runs here to build it.

The image must serve on the server's default ports, run as the non-root user the Helm chart
expects, start `rtdiff serve`, and find every file it copies in the build context that
.dockerignore leaves.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import yaml

from rtdiff_cluster.config import ServerConfig

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "deploy" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return [(word.upper(), rest.strip()) for word, _, rest in (ln.strip().partition(" ") for ln in logical)]


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def final(name: str) -> list[str]:
    return [args for ins, args in stages()[-1] if ins == name]


def arg_default(name: str) -> str:
    for ins, args in instructions():
        if ins == "ARG" and args.startswith(name + "="):
            return args.split("=", 1)[1]
    raise AssertionError(f"no ARG {name}")


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        raw = raw.strip()
        if not raw or raw.startswith("#"):
            continue
        negate, pattern = raw.startswith("!"), raw.lstrip("!").strip("/")
        regex = (re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
                 .replace(r"\*", "[^/]*").replace(r"\?", "[^/]"))
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_image_is_cuda_based():
    assert arg_default("CUDA_IMAGE").startswith("nvidia/cuda:")
    assert all(args.startswith("${CUDA_IMAGE}") for ins, args in instructions() if ins == "FROM")


def test_exposed_ports_are_the_servers_defaults():
    exposed = {int(p.split("/")[0]) for args in final("EXPOSE") for p in args.split()}
    defaults = ServerConfig()
    assert exposed == {defaults.port, defaults.metrics_port}


def test_runs_as_the_non_root_user_the_chart_expects():
    (user,) = final("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root uid, so runAsNonRoot can check it"
    chart = yaml.safe_load((REPO / "helm" / "rtdiff-cluster" / "values.yaml").read_text())
    assert chart["podSecurityContext"]["runAsUser"] == int(uid)
    assert chart["podSecurityContext"]["runAsNonRoot"] is True


def test_entrypoint_is_rtdiff_serve():
    (entrypoint,) = final("ENTRYPOINT")
    assert json.loads(entrypoint) == ["rtdiff", "serve"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["rtdiff"] == "rtdiff_cluster.cli:main"


def test_installs_the_project_with_the_torch_and_ray_the_rest_of_the_repo_uses():
    build = " ".join(args for ins, args in stages()[0] if ins == "RUN")
    assert re.search(r'pip install "\.\$\{EXTRAS:\+\[\$EXTRAS\]\}" ', build), "the project itself is installed"
    assert arg_default("EXTRAS") == "", "optional extras are opt-in"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "flash4" in extras, "the extra deploy/README.md names exists"
    setup_default = re.search(r"TORCH_SPEC=\$\{TORCH_SPEC:-([^}]+)\}", (REPO / "scripts" / "setup.sh").read_text())
    assert arg_default("TORCH_SPEC") == setup_default.group(1)
    chart = yaml.safe_load((REPO / "helm" / "rtdiff-cluster" / "values.yaml").read_text())
    assert arg_default("RAY_SPEC") == f"ray[default]=={chart['ray']['version']}"


def test_copied_files_exist_and_reach_the_build_context():
    sources = []
    for ins, args in instructions():
        if ins == "COPY" and "--from" not in args:
            *srcs, _dest = shlex.split(args)
            sources += srcs
    assert sources
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: no such file"
        files = [src] if (REPO / src).is_file() else [str(p.relative_to(REPO)) for p in (REPO / src).rglob("*.py")]
        assert files and not any(dockerignore_excludes(f) for f in files), f"COPY {src}: excluded by .dockerignore"
    # setuptools reads the readme named in pyproject.toml while it builds the package.
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["readme"] in sources


def test_dockerignore_keeps_local_state_out():
    for path in (".venv/bin/python", ".git/config", ".tools/bin/helm", "frames/frame-0.png", "benchmarks/results/x.json",
                 "rtdiff_cluster/__pycache__/config.cpython-311.pyc", "__pycache__/x.pyc"):
        assert dockerignore_excludes(path), path
