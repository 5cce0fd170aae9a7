"""Build kvxfer._C with CMake (csrc/CMakeLists.txt). Options: KVXFER_BUILD_CUDA=0/1, KVXFER_BUILD_TYPE."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("KVXFER_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DKVXFER_VERSION={self.distribution.get_version()}",
        ]
        archs = os.environ.get("KVXFER_CUDA_ARCHS", "").strip()  # e.g. "75;90", "75 90" or "native"
        # Given: the GPUs whose kernels to build. Not given: CMake's default (csrc/CMakeLists.txt), also in a build
        # folder where an earlier KVXFER_CUDA_ARCHS is cached.
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(archs.replace(',', ' ').split())}" if archs
                    else "-UCMAKE_CUDA_ARCHITECTURES")
        if "KVXFER_BUILD_CUDA" in os.environ:
            args.append(f"-DKVXFER_BUILD_CUDA={'ON' if os.environ['KVXFER_BUILD_CUDA'] == '1' else 'OFF'}")
        try:
            import ninja  # noqa: F401

            args.append("-GNinja")
        except ImportError:
            pass
        (out_dir / "_ucx.so").unlink(missing_ok=True)  # this build makes it again only when UCX is found
        subprocess.run(["cmake", ext.source_dir, *args], cwd=build_dir, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)

    # The UCX transport is a plugin beside _C (csrc/CMakeLists.txt) that setuptools does not know of: in-place and
    # editable builds copy it into the source tree with _C (a wheel takes it from build_lib with the package), and
    # drop a stale one when this build has no UCX.
    def _ucx_plugin(self) -> tuple[Path, Path]:
        return Path(self.build_lib) / "kvxfer" / "_ucx.so", ROOT / "kvxfer" / "_ucx.so"

    def copy_extensions_to_source(self) -> None:
        super().copy_extensions_to_source()
        built, placed = self._ucx_plugin()
        if built.exists():
            shutil.copy2(built, placed)
        elif placed.exists():
            placed.unlink()

    def _get_output_mapping(self):
        yield from super()._get_output_mapping()
        built, placed = self._ucx_plugin()
        if self.inplace and built.exists():
            yield str(built), str(placed)


setup(
    ext_modules=[CMakeExtension("kvxfer._C", ROOT / "csrc")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
