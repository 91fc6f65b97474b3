"""Builds the native CPU kernel (kernels/conv_relu_pool_cpu.c) at install time; everything else is in pyproject.toml.

The C file becomes plain shared libraries loaded with ctypes (not Python extension modules: no tie to a Python
or torch ABI), one per instruction set on x86-64 so that one install serves every x86-64 CPU, and the loader
(kernels/conv_relu_pool_cpu.py) picks the best one the CPU runs. A build that fails (no C compiler, an old one)
is reported and skipped, never fatal: the op then runs its plain-PyTorch branch and ``fastcnn env`` says why.
"""

import os
import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCE = "kernels/conv_relu_pool_cpu.c"
# No -ffast-math: the NaN and tie rules need IEEE comparisons. -Wno-psabi: GCC notes on passing 64-byte vectors.
COMMON = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-psabi"]

if platform.machine().lower() in ("x86_64", "amd64"):
    # gcc emits 256-bit vectors for x86-64-v4 unless told otherwise; 512-bit ones were measured faster here.
    BUILDS = {
        "avx512": ["-march=x86-64-v4", "-mprefer-vector-width=512"],
        "avx2": ["-march=x86-64-v3"],
        "baseline": [],
    }
else:
    BUILDS = {"baseline": []}


class CtypesLibrary(Extension):
    """A shared library for ctypes: named lib<name>.so, no Python module init."""


class BuildNativeKernels(build_ext):
    def get_ext_filename(self, fullname):
        ext = next((e for e in self.extensions if e.name.split(".")[-1] == fullname.split(".")[-1]), None)
        if isinstance(ext, CtypesLibrary):
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def get_export_symbols(self, ext):
        return [] if isinstance(ext, CtypesLibrary) else super().get_export_symbols(ext)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as err:  # any compiler or linker failure: install without this build
            print(f"fastcnn: could not build {ext.name} ({err}); the fused op will use the plain PyTorch chain "
                  "on CPUs this build would have served", file=sys.stderr)


setup(
    ext_modules=[
        # optional: a build that fails is skipped by the editable install's copy into the source tree too
        CtypesLibrary(f"fastcnn.kernels.libfastcnn_cpu_{name}", [SOURCE], optional=True,
                      extra_compile_args=COMMON + flags, extra_link_args=["-fopenmp"])
        for name, flags in BUILDS.items()
    ],
    cmdclass={"build_ext": BuildNativeKernels},
)
