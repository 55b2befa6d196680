"""Build hook: compiles the TensorFlow kernels of custom_ops/ into the package.

Everything declarative lives in setup.cfg; this file only adds the kernel build, which needs the
installed TensorFlow's compile and link flags and so cannot be described statically.
"""
import os
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithKernels(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            # Editable installs (make demo / make test) build in place through `make kernels`.
            return
        out = os.path.join(self.build_lib, "kerasdet", "ops", "_lib")
        cmd = [sys.executable, os.path.join(HERE, "custom_ops", "build.py"), "--out", out]
        # A failed kernel build must not make the package uninstallable: the ops fall back to
        # pure TensorFlow with a warning. KERASDET_REQUIRE_KERNELS=1 turns the failure into an error.
        result = subprocess.run(cmd)
        if result.returncode != 0:
            if os.environ.get("KERASDET_REQUIRE_KERNELS") == "1":
                raise SystemExit("custom_ops/build.py failed")
            print("warning: kerasdet kernels did not build; pure-TensorFlow fallbacks will be used",
                  file=sys.stderr)


setup(cmdclass={"build_py": BuildPyWithKernels})
