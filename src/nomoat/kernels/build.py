"""Compiles nomoat's C++ kernels (`csrc/`) for this CPU on first use and loads them as the `nomoat` torch library.

The CPU's instruction sets are read at run time (`/proc/cpuinfo` flags, `torch.backends.cpu.get_cpu_capability()`)
and decide the variant built: `avx512` (x86-64-v4, plus AVX-512-BF16 / VNNI where present), `avx2` (x86-64-v3),
`sse` (x86-64), `neon` (aarch64) or `portable`. Each variant is its own build in torch's extension cache
(`TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`), so a home directory shared by machines of different
CPUs never hands one machine's build to another; a build's name carries a hash of the sources, and the sources are
compiled from a copy inside the build's folder, so two versions of nomoat (or two checkouts of one) never rebuild
over each other's build. `torch.utils.cpp_extension.load` compiles it
(about a minute, once, with a one-line notice) with ninja, and `torch.ops.load_library` registers
`torch.ops.nomoat.*` and `torch.classes.nomoat.*`. Without a compiler, with `NOMOAT_KERNELS=0`, or on any build or
load failure, `load()` returns False after a one-line notice, and every op runs its plain-PyTorch reference
(`reference.py`). `NOMOAT_KERNELS_ISA` (one of `VARIANTS`) forces a lower variant, for comparisons.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from nomoat.util.files import atomic_write_bytes

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("linear.cpp", "linear_rows.cpp", "q4.cpp", "attention.cpp", "decode_stack.cpp", "fused_ops.cpp",
           "lora_rows.cpp", "nf4.cpp", "argmax.cpp", "registration.cpp")
VARIANTS = ("portable", "sse", "avx2", "avx512", "neon")  # the order of `torch.ops.nomoat.isa()`'s answer
_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}
_AVX2 = {"avx2", "fma", "f16c", "bmi2"}


@dataclass(frozen=True)
class Variant:
    """One build of the kernels: its name (part of the cached build's name) and compiler flags."""

    name: str
    isa: str
    flags: tuple[str, ...]


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (`flags` on x86, `Features` on ARM); empty where unreadable."""
    line = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            line = next((x for x in f if x.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


def pick_variant(machine: str, flags: frozenset[str], capability: str, forced: str | None = None) -> Variant:
    """The best build for a CPU.

    Args:
        machine: `platform.machine()` ("x86_64", "aarch64", ...).
        flags: Its /proc/cpuinfo feature flags.
        capability: `torch.backends.cpu.get_cpu_capability()` ("AVX512", "AVX2", "DEFAULT", ...): torch's own
            choice, lowered by `ATEN_CPU_CAPABILITY`; the kernels never go above it on x86.
        forced: A variant name to use at most (`NOMOAT_KERNELS_ISA`), or None.
    """
    machine = machine.lower()
    if machine in ("x86_64", "amd64"):
        isa = "sse"
        if _AVX2 <= flags and capability.upper() in ("AVX2", "AVX512"):
            isa = "avx2"
        if _AVX512 <= flags and capability.upper() == "AVX512":
            isa = "avx512"
        order = ("sse", "avx2", "avx512")
        if forced in order and order.index(forced) < order.index(isa):
            isa = forced
        if isa == "avx512":
            extras = [f for f, flag in (("bf16", "avx512_bf16"), ("vnni", "avx512_vnni")) if flag in flags]
            march = ["-march=x86-64-v4"] + [f"-mavx512{e}" for e in extras]
            return Variant("_".join(["avx512", *extras]), isa, (*march, "-mtune=native"))
        march = {"avx2": "-march=x86-64-v3", "sse": "-march=x86-64"}[isa]
        return Variant(isa, isa, (march, "-mtune=native"))
    if machine in ("aarch64", "arm64") and forced != "portable":
        return Variant("neon", "neon", ("-march=armv8-a",))
    return Variant("portable", "portable", ())


def current_variant() -> Variant:
    """The variant for the CPU this process runs on (read now, never cached across machines)."""
    capability = "DEFAULT"
    with contextlib.suppress(Exception):
        capability = torch.backends.cpu.get_cpu_capability()
    return pick_variant(platform.machine(), cpu_flags(), capability, os.environ.get("NOMOAT_KERNELS_ISA"))


def _ninja_on_path() -> None:
    """Put the `ninja` of the `ninja` Python package (a dependency) on PATH when none is there.

    torch's extension builder runs `ninja` from PATH; in a virtualenv that is not activated (`.venv/bin/nomoat`),
    the package's binary is not on it.
    """
    if shutil.which("ninja") is not None:
        return
    with contextlib.suppress(ImportError, AttributeError):
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


_lock = threading.Lock()
_state: dict[str, object] = {}


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on the build folder: one process builds at a time, and a killed one never blocks.

    torch's own build lock is a plain file that waits while it exists: a build killed midway (Ctrl-C during the
    first compile) leaves it behind and every later process would wait forever. The kernel releases a `flock` when
    its holder dies, so whoever holds it may remove torch's file: no other nomoat process is building.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock alone
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "nomoat-build.flock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        (directory / "lock").unlink(missing_ok=True)
        yield


def _sources_hash(variant: Variant) -> str:
    """Eight hex digits naming the build: every file of `csrc/` and the variant's flags."""
    digest = hashlib.sha256(" ".join(variant.flags).encode())
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:8]


def _staged_sources(folder: Path) -> list[str]:
    """Copy `csrc/` into the build's own folder and name the sources there.

    ninja's build file names its sources by absolute path: built from the package's own folder, two installs of the
    same sources (two checkouts, two virtualenvs) would rewrite each other's build file and rebuild in turn. Staged
    in the build folder (named by the sources' hash), the paths are the same for every install.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for path in CSRC.iterdir():
        if path.suffix in (".cpp", ".h"):
            staged = folder / path.name
            data = path.read_bytes()
            if not staged.is_file() or staged.read_bytes() != data:
                atomic_write_bytes(staged, data)
    return [str(folder / s) for s in SOURCES]


def _build(variant: Variant) -> bool:
    """Compile (or reuse the cached build of) `variant` and load it; False (with a one-line notice) on failure."""
    fallback = "nomoat's ops run their plain PyTorch references (slower)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        logger.warning("no C++ compiler found for nomoat's kernels: %s", fallback)
        return False
    _ninja_on_path()
    name = f"nomoat_kernels_{variant.name}_{_sources_hash(variant)}"
    try:
        from torch.utils import cpp_extension

        with contextlib.suppress(Exception):  # a private torch helper: only used to say that a build is coming
            if not (Path(cpp_extension._get_build_directory(name, False)) / f"{name}.so").exists():
                logger.warning("compiling nomoat's kernels for this CPU (%s; once, about a minute)...", variant.name)
        flags = ["-O3", *variant.flags, "-ffp-contract=fast", "-fopenmp"]
        build_dir = Path(cpp_extension._get_build_directory(name, False))
        with _build_lock(build_dir):
            sources = _staged_sources(build_dir / "csrc")
            cpp_extension.load(name=name, sources=sources, extra_cflags=flags, extra_ldflags=["-fopenmp"],
                               build_directory=str(build_dir), is_python_module=False, verbose=False)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - any build or load failure means: the references
        first = str(exc).splitlines()[0] if str(exc) else ""
        logger.warning("could not build nomoat's kernels (%s: %s); %s", type(exc).__name__, first, fallback)
        return False
    logger.info("nomoat kernels loaded (%s)", variant.name)
    return True


def load() -> bool:
    """Whether `torch.ops.nomoat` is usable: builds and loads the kernels on the first call (thread-safe).

    The answer is kept for the process; `NOMOAT_KERNELS=0` answers False without building.
    """
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                _state["ok"] = os.environ.get("NOMOAT_KERNELS", "1") != "0" and _build(current_variant())
    return bool(_state["ok"])


def reset() -> None:
    """Forget the last answer of `load` (the library, once loaded, stays loaded); for tests."""
    with _lock:
        _state.clear()
