"""XLA flags resflax sets by default, and why (see docs/performance.md).

``--xla_cpu_experimental_ynn_fusion_type=eltwise,reduce`` makes XLA:CPU run elementwise and reduction fusions
through YNNPACK (not on CPUs where it was measured to compute wrong gradients, see ``YNN_UNSAFE_CPU``;
``RESFLAX_XLA_DEFAULTS=force`` sets it there too). On this project's ResNets it roughly doubles the CPU
training step and makes it scale
linearly with depth: without it, XLA fuses whole BN + add + ReLU chains into the transposes that feed the
weight-gradient convolutions and recomputes them (81% of ResNet-110's step), and compile time grows too.
The flag is experimental: an unknown value aborts the process, so it is only set for the jaxlib versions it
was tested with, and never when the user's ``XLA_FLAGS`` already mention it. ``RESFLAX_XLA_DEFAULTS=0``
turns the defaults off. XLA reads ``XLA_FLAGS`` once, when the first backend starts, so :func:`configure`
runs when ``resflax.models`` is imported; importing (or initialising) JAX's backend earlier is fine as long as
no computation ran before.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import jaxlib

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_VALUE = "eltwise,reduce"
# jaxlib versions the flag is set for. Not 0.12.0.1 (the newest, 2026-12-05): measured on the AVX512-FP16 CPU
# below (``python benchmarks/flag_numerics.py``, the comparisons of tests/test_speed_numerics.py) its YNNPACK
# fusions are as wrong as 0.10.2's there ("eltwise,reduce": synchronised BN's gradients 4.1% of the leaf's
# largest value off; "eltwise": 1.4e-5, 8x the float32 difference; XLA's default "reduce": 1.7e-6, fine), and
# no CPU without AVX512-FP16 was at hand to check it on, so it is left out everywhere until one is; the speed it
# would give there is in docs/performance.md ("Training throughput by JAX version").
TESTED_JAXLIB = ("0.10.2",)
# CPUs on which jaxlib 0.10.2's YNNPACK fusions compute wrong or loose numbers, so resflax adds no flag there
# (XLA's own default). Measured on a Sapphire Rapids Xeon (AMX, AVX512-FP16), fast layers against nn.BatchNorm
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


def configure() -> list[str]:
    """Appends resflax's default flags to ``XLA_FLAGS`` (once); returns the flags it added."""
    global _configured
    if _configured is not None:
        return _configured
    _configured = []
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
_OFF = ("0", "false", "False", "no", "off")


def compilation_cache(cache_dir: str | os.PathLike | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache in ``cache_dir`` (default: the user cache folder's ``xla/``,
    ``~/.cache/resflax/xla``) unless ``RESFLAX_COMPILATION_CACHE=0``, or the user or JAX's config already chose a
    cache (``JAX_COMPILATION_CACHE_DIR`` or ``jax_compilation_cache_dir``: kept as it is), or the folder cannot
    be made or written (then nothing, silently). Returns the folder now in use, None if none was set here.

    Call it before JAX compiles anything: JAX decides whether a process uses the cache at its first compile.
    Several processes may share the folder: JAX writes one file per program, named by a hash of the program,
    the compile options, the XLA flags, the devices and the jax/jaxlib versions, never rewrites a key that is
    there, and a read that fails (say a file another process is still writing) is a warning and a compile, not
    a wrong program (``jax/_src/lru_cache.py``, ``compiler._cache_read``)."""
    if os.environ.get(CACHE_ENV, "1") in _OFF or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    import jax  # noqa: PLC0415 (start-up time: only the commands that run JAX call this)

    if jax.config.jax_compilation_cache_dir:
        return None
    if cache_dir is None:
        from resflax.configs import user_cache_dir  # noqa: PLC0415

        cache_dir = user_cache_dir() / "xla"
    path = os.fspath(cache_dir)
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECS)
    return path
