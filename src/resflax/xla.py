"""XLA flags resflax sets by default, and why (see docs/performance.md).

``--xla_cpu_experimental_ynn_fusion_type=eltwise,reduce`` makes XLA:CPU run elementwise and reduction fusions
through YNNPACK (not on CPUs where it was measured to compute wrong gradients, see ``YNN_UNSAFE_CPU``;
``RESFLAX_XLA_DEFAULTS=force`` sets it there too). On this project's ResNets it roughly doubles the CPU
training step and makes it scale
linearly with depth: without it, XLA fuses whole BN + add + ReLU chains into the transposes that feed the
weight-gradient convolutions and recomputes them (81% of ResNet-110's step), and compile time grows too.
The flag is experimental: an unknown value aborts the process, so it is only set for the jaxlib versions it
was tested with, and never when the user's ``XLA_FLAGS`` already mention it. ``RESFLAX_XLA_DEFAULTS=0``
turns the defaults off; ``resflax predict`` runs without them (``configure(training=False)``: its one forward
pass is slower with the flag). XLA reads ``XLA_FLAGS`` once, when the first backend starts, so :func:`configure`
runs when ``resflax.models`` is imported (the CLI calls it earlier, per command); importing (or initialising)
JAX's backend earlier is fine as long as no computation ran before.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import warnings

import jaxlib

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_VALUE = "eltwise,reduce"
# jaxlib versions the flag is set for (where the CPU allows, see YNN_UNSAFE_CPU), each checked on a CPU without
# AVX512-FP16 with ``python benchmarks/flag_numerics.py`` (the comparisons of tests/test_speed_numerics.py):
# 0.12.0.1 (the newest, 2026-12-05) on an AMD EPYC Zen 4: "eltwise,reduce" within float32 rounding (worst 2.0e-6
# of the leaf's largest value, 2-device synchronised BN; no flag 1.7e-6), and 1.3-2.9x the train step of
# ResNet-20/56/110 there (docs/performance.md, "Training throughput by JAX version"). A jaxlib not listed gets
# no flag: an unknown value of an experimental flag aborts the process, and its numerics are unchecked.
TESTED_JAXLIB = ("0.10.2", "0.12.0.1")
# CPUs on which jaxlib 0.10.2's and 0.12.0.1's YNNPACK fusions compute wrong or loose numbers, so resflax adds no flag
# there (XLA's own default). Measured on a Sapphire Rapids Xeon (AMX, AVX512-FP16), fast layers against nn.BatchNorm
# (tests/test_speed_numerics.py): with "eltwise,reduce" synchronised BN's gradients came out up to 4% of the
# leaf's largest value off; with "eltwise" alone one forward/backward of ResNet-8 differed by 1.1e-5 of it (7x
# what the same comparison gives elsewhere); "reduce" alone (XLA's default) and no flag agree to float32
# rounding (1.5e-6). The cost there: ResNet-20's CPU step at 245 img/s against 376 ("eltwise") and 395
# ("eltwise,reduce"), benchmarks/step_time.py, batch 128, same machine.
YNN_UNSAFE_CPU = frozenset({"avx512_fp16"})

_configured: list[str] | None = None


def _backend_started() -> bool:
    try:
        # JAX's private API, looked up only here: a JAX that moved it must not stop resflax from importing
        from jax._src import xla_bridge  # noqa: PLC0415

        return bool(getattr(xla_bridge, "_backends", {}))
    except Exception:  # pragma: no cover - private API moved
        return False


def cpu_features() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (``/proc/cpuinfo``); empty where that is not readable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def default_flags(jaxlib_version: str | None = None, cpu: frozenset[str] | None = None) -> list[str]:
    """The flags resflax would add for this jaxlib (empty if the version is untested) on a CPU with the
    features ``cpu`` (default: this one's)."""
    if jaxlib_version is None:
        jaxlib_version = jaxlib.__version__
    if jaxlib_version not in TESTED_JAXLIB:
        return []
    cpu = cpu_features() if cpu is None else cpu
    if cpu & YNN_UNSAFE_CPU:
        return []
    return [f"{YNN_FLAG}={YNN_VALUE}"]


def configure(training: bool = True) -> list[str]:
    """Appends resflax's default flags to ``XLA_FLAGS`` (once: the first call in a process decides); returns the
    flags it added. ``training=False`` adds none: for a process that only runs a forward pass (``resflax
    predict``), which the YNN flag slows (ResNet-50 on one image, AMD EPYC Zen 4: 0.41 s with it, 0.22-0.29 s
    without; docs/performance.md, "Start-up: cold and warm")."""
    global _configured
    if _configured is not None:
        return _configured
    _configured = []
    if not training:
        return _configured
    mode = os.environ.get("RESFLAX_XLA_DEFAULTS", "1")
    if mode in ("0", "false", "False", "no"):
        return _configured
    current = os.environ.get("XLA_FLAGS", "")
    flags = default_flags(cpu=frozenset() if mode == "force" else None)
    add = [f for f in flags if f.split("=")[0] not in current]
    if not add:
        return _configured
    if _backend_started():
        warnings.warn(
            "resflax: JAX's backend started before resflax.models was imported, so the default XLA flags "
            f"{add} are not in effect (CPU training is ~2x slower); import resflax first or set XLA_FLAGS.",
            stacklevel=3,
        )
        return _configured
    os.environ["XLA_FLAGS"] = (current + " " + " ".join(add)).strip()
    _configured = add
    return _configured


# The persistent compilation cache the CLI turns on (see compilation_cache below and docs/performance.md).
CACHE_ENV = "RESFLAX_COMPILATION_CACHE"
# Programs that compiled faster than this are not written. JAX's default (1 s) leaves out most of what a small
# run compiles on CPU (eval of a CIFAR ResNet-8 on mock data: every program under 1 s), so those starts stayed
# cold; 0 writes them all (measured in benchmarks/start_time.py, table in docs/performance.md).
CACHE_MIN_COMPILE_SECS = 0.0
# The folder's bound: when a start finds more than this in it, the least recently used entries are deleted
# until it holds half (prune_cache). ResNet-50's predict program is 73 KB, import's 42 KB, and ResNet-8's first
# training start writes 76 programs: this keeps thousands.
CACHE_MAX_BYTES = 1 << 30
CACHE_SUFFIX = "-cache"  # JAX's entry files: <key>-cache (jax/_src/lru_cache.py)
_TMP = ".tmp-"  # an entry being written (atomic_cache_writes): renamed into place when complete
_OFF = ("0", "false", "False", "no", "off")


def compilation_cache(cache_dir: str | os.PathLike | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache in ``cache_dir`` (default: the user cache folder's ``xla/``,
    ``~/.cache/resflax/xla``) unless ``RESFLAX_COMPILATION_CACHE=0``, or the user or JAX's config already chose a
    cache (``JAX_COMPILATION_CACHE_DIR`` or ``jax_compilation_cache_dir``: kept as it is), or the folder cannot
    be made or written (then nothing, silently). Returns the folder now in use, None if none was set here.

    Call it before JAX compiles anything: JAX decides whether a process uses the cache at its first compile.
    Several processes may share the folder: JAX names each entry by a hash of the program, the compile options,
    the XLA flags, the devices and the jax/jaxlib versions and never rewrites a key that is there; resflax makes
    each write atomic (``atomic_cache_writes``: JAX's own truncates and writes in place, so a reader could meet
    half an entry), and bounds the folder (``prune_cache``, ``CACHE_MAX_BYTES``)."""
    if os.environ.get(CACHE_ENV, "1") in _OFF or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    import jax  # noqa: PLC0415 (start-up time: only the commands that run JAX call this)

    if jax.config.jax_compilation_cache_dir:
        return None
    if cache_dir is None:
        from resflax.configs import user_cache_dir  # noqa: PLC0415

        cache_dir = user_cache_dir() / "xla"
    path = os.path.abspath(os.fspath(cache_dir))
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError:
        return None
    prune_cache(path)
    atomic_cache_writes()
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECS)
    return path


def prune_cache(path: str | os.PathLike, max_bytes: int = CACHE_MAX_BYTES, stale_secs: float = 3600.0) -> int:
    """Deletes the least recently used entries of the cache folder ``path`` (by the later of a file's access and
    modification time) while it holds more than ``max_bytes``, down to half of it, and entries a killed process
    left half written (``.tmp-*`` older than ``stale_secs``). Returns the bytes freed. One ``stat`` per entry:
    a few milliseconds per start. An entry deleted while another process reads it is, for that process, a
    warning and a compile (``compiler._cache_read``), not an error."""
    now, entries, total, freed = time.time(), [], 0, 0
    try:
        with os.scandir(path) as it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if e.name.startswith(_TMP) and now - st.st_mtime > stale_secs:
                    with contextlib.suppress(OSError):
                        os.unlink(e.path)
                        freed += st.st_size
                elif e.name.endswith(CACHE_SUFFIX) and e.is_file(follow_symlinks=False):
                    entries.append((max(st.st_atime, st.st_mtime), st.st_size, e.path))
                    total += st.st_size
    except OSError:
        return freed
    if total <= max_bytes:
        return freed
    for _, size, f in sorted(entries):
        if total <= max_bytes // 2:
            break
        with contextlib.suppress(OSError):
            os.unlink(f)
            total -= size
            freed += size
    return freed


def atomic_cache_writes() -> bool:
    """Makes this process's JAX write each persistent-cache entry to a temporary file beside it and rename it
    into place (``os.replace``, atomic on a POSIX file system), so that another process sharing the folder reads
    a whole entry or none. JAX's ``LRUCache.put`` writes the file in place (``write_bytes``) when no size limit
    is set, so a concurrent reader could meet a truncated entry: a warning and a recompile in that process, and
    an entry left truncated for good by a process killed while writing it. Uses JAX's private modules; returns
    False (JAX's own writes) if a JAX version moved them."""
    try:
        from jax._src import compilation_cache as cc  # noqa: PLC0415 (private API, looked up only here)
        from jax._src import lru_cache  # noqa: PLC0415
    except ImportError:  # pragma: no cover - private API moved
        return False
    base = getattr(lru_cache, "LRUCache", None)
    if getattr(cc, "LRUCache", None) is not base:
        return getattr(getattr(cc, "LRUCache", None), "atomic", False)  # done already in this process (or moved)
    if base is None or getattr(lru_cache, "_CACHE_SUFFIX", None) != CACHE_SUFFIX:
        return False  # a JAX whose cache differs from the one checked

    class AtomicLRUCache(base):
        atomic = True

        def put(self, key: str, value: bytes) -> None:
            folder = os.fspath(self.path)
            if getattr(self, "eviction_enabled", True) or not key or "://" in folder:
                return super().put(key, value)  # with a size limit JAX locks every read and write
            target = os.path.join(folder, f"{key}{CACHE_SUFFIX}")
            if os.path.exists(target):
                return None
            fd, tmp = tempfile.mkstemp(prefix=_TMP, dir=folder)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(value)
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            return None

    cc.LRUCache = AtomicLRUCache
    return True
