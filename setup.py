"""Builds hvkit: the native KVM extension (Cython + C) and the guests."""
import os
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildWithGuests(build_py):
    """Compile the freestanding guests into hvkit/guests/*.elf."""

    def run(self):
        subprocess.check_call(["make", "-C", os.path.join(HERE, "guests"),
                               f"OUT={os.path.join(HERE, 'hvkit', 'guests')}"])
        super().run()


#: C shared by the native engines (io_uring, guest RAM, file I/O, polling)
COMMON = ["native/common/uring.c", "native/common/guestmem.c", "native/common/fileio.c",
          "native/common/hostcpu.c"]


def extensions():
    from Cython.Build import cythonize
    ext = Extension(
        "hvkit._native",
        sources=["native/_native.pyx", "native/runloop.c"],
        include_dirs=["native"],
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
    )
    nvme = Extension(
        "hvkit._nvme_native",
        sources=["native/nvme/_nvme_native.pyx", "native/nvme/engine.c", *COMMON],
        include_dirs=["native/nvme", "native/common"],
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
    )
    virtio = Extension(
        "hvkit._virtio_native",
        sources=["native/virtio/_virtio_native.pyx", "native/virtio/blk_engine.c", *COMMON],
        include_dirs=["native/virtio", "native/common"],
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
    )
    return (cythonize([ext], include_path=["native"],
                      compiler_directives={"language_level": "3"})
            + cythonize([nvme], include_path=["native/nvme"], build_dir="build/cython",
                        compiler_directives={"language_level": "3"})
            + cythonize([virtio], include_path=["native/virtio"], build_dir="build/cython",
                        compiler_directives={"language_level": "3"}))


setup(
    ext_modules=extensions(),
    cmdclass={"build_py": BuildWithGuests},
)
