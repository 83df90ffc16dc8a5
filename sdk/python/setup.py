"""Builds the SDK with the ``serving.v1`` stubs generated into it (wheel, sdist install or editable install);
nothing generated is committed. The generation itself is in ``gen_stubs.py``."""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # PEP 517 backends do not put the project directory on sys.path
from gen_stubs import generate_stubs  # noqa: E402


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        super().run()
        # Editable installs import from src/, so the stubs go there (git-ignored); a wheel gets them in build_lib.
        root = HERE / "src" if self.editable_mode else Path(self.build_lib)
        generate_stubs(root / "serving_sdk")


setup(cmdclass={"build_py": BuildPyWithStubs})
