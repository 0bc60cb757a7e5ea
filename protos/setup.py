"""Build hook: every build of advgrpo-protos (``pip install ./protos``, an editable install, a
wheel, the Docker images) generates the protobuf/gRPC modules from the .proto files first, so the
wire contract installs from a plain checkout. The generated files are not in git; ``make proto`` regenerates
them in a checkout after the .proto changes. Everything else is in pyproject.toml."""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate_protos() -> None:
    """protoc over every .proto under protos/ whose generated modules are missing or older."""
    for proto in sorted(PROTO_ROOT.rglob("*.proto")):
        outputs = [proto.with_name(proto.stem + s) for s in SUFFIXES]
        if all(o.exists() and o.stat().st_mtime >= proto.stat().st_mtime for o in outputs):
            continue
        try:
            from grpc_tools import protoc
        except ImportError:
            raise SystemExit(
                "building advgrpo needs grpcio-tools (build-system.requires in pyproject.toml) to generate "
                f"the modules of {proto.relative_to(ROOT)}"
            ) from None
        include = Path(protoc.__file__).parent / "_proto"  # the well-known types
        args = [
            "protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={PROTO_ROOT}", f"--pyi_out={PROTO_ROOT}",
            f"--grpc_python_out={PROTO_ROOT}", str(proto),
        ]  # fmt: skip
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto.relative_to(ROOT)}")


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
