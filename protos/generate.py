"""Regenerate the Python protobuf/gRPC modules from the .proto files.

Run ``python protos/generate.py`` after editing a .proto file (needs grpcio-tools,
from the ``dev`` extra). The generated ``*_pb2*.py`` files are committed and never
edited by hand; ``tests/unit/test_protos.py`` fails when they are out of date.

The .proto files are compiled as if they lived at ``taskandgo/protos/`` so the
generated gRPC modules import their messages as ``taskandgo.protos.X_pb2``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ("taskandgo.proto", "peer.proto")


def generate(out_dir: Path) -> list[Path]:
    """Compile every .proto into out_dir; return the files written."""
    from grpc_tools import protoc  # dev-only dependency

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src" / "taskandgo" / "protos"
        dst = Path(tmp) / "out"
        src.mkdir(parents=True)
        dst.mkdir()
        for name in PROTOS:
            shutil.copy(HERE / name, src / name)
        args = [
            "protoc",
            f"-I{Path(tmp) / 'src'}",
            f"--python_out={dst}",
            f"--pyi_out={dst}",
            f"--grpc_python_out={dst}",
        ] + [f"taskandgo/protos/{name}" for name in PROTOS]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        written = []
        for path in sorted((dst / "taskandgo" / "protos").iterdir()):
            target = out_dir / path.name
            shutil.copy(path, target)
            written.append(target)
        return written


if __name__ == "__main__":
    for p in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(p)
