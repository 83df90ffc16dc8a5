"""Generates the ``serving.v1`` stubs into ``serving_sdk/v1`` from the repository's protos.

protoc names imports after the proto paths (``from serving.v1 import common_pb2``); the SDK ships them as
``serving_sdk.v1`` so that it never shadows or needs the server's ``serving`` package, and the imports are
rewritten to match. ``setup.py`` runs this at build time; ``python gen_stubs.py`` refreshes ``src/`` for
development (``make setup`` does).
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = HERE / "protos"  # a symlink to the repository's protos/ (the sdist carries a copy)
_IMPORT = re.compile(r"^(from|import) serving\.v1\b", re.MULTILINE)
_MODULE = re.compile(r"'serving\.v1\.(\w+_pb2)'")  # the module name the message classes report


def generate_stubs(package_dir: Path) -> None:
    """Writes ``v1/*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` under ``package_dir`` (``.../serving_sdk``)."""
    from grpc_tools import protoc  # a build requirement (pyproject.toml)

    protos = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "serving" / "v1").glob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {PROTOS / 'serving' / 'v1'}")
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory() as out:
        args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}"]
        if protoc.main([*args, f"--grpc_python_out={out}", *protos]) != 0:
            raise RuntimeError("protoc failed on " + " ".join(protos))
        target = package_dir / "v1"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for source in sorted((Path(out) / "serving" / "v1").iterdir()):
            text = _MODULE.sub(r"'serving_sdk.v1.\1'", _IMPORT.sub(r"\1 serving_sdk.v1", source.read_text()))
            (target / source.name).write_text(text)
        (target / "__init__.py").write_text('"""Generated from protos/serving/v1 at build time; do not edit."""\n')


if __name__ == "__main__":
    generate_stubs(HERE / "src" / "serving_sdk")
    sys.exit(0)
