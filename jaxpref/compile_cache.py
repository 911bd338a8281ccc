"""JAX's persistent compilation cache, on by default for jaxpref's scripts.

Compiling the train step or the scorer of a 30-layer model takes seconds to minutes on a CPU, and a
second run of the same script with the same shapes compiles exactly the same programs. With the cache,
that second run loads them from disk instead (XLA executables keyed by the program, the compile
options and the backend), so it compiles nothing.

Where the cache lives, in order of precedence:

1. ``JAX_COMPILATION_CACHE_DIR`` (JAX's own setting) or a ``jax_compilation_cache_dir`` already set in
   the process: left alone, so a user's or a launcher's choice wins;
2. ``JAXPREF_COMPILATION_CACHE``: a directory, or ``off`` / ``0`` / ``false`` / ``none`` to disable;
3. ``$XDG_CACHE_HOME/jaxpref/jax-compilation-cache`` (``~/.cache/...`` without ``XDG_CACHE_HOME``).

Every program is cached, however short its compile (``jax_persistent_cache_min_compile_time_secs = 0``:
a scorer recompiled per shape is many small programs), and the directory is kept under
``MAX_BYTES`` by JAX's least-recently-used eviction.
"""

from __future__ import annotations

import logging
import os
import pathlib

import jax

log = logging.getLogger(__name__)

ENV = "JAXPREF_COMPILATION_CACHE"
OFF = ("off", "0", "false", "none", "no")
MAX_BYTES = 4 << 30


def default_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "jaxpref" / "jax-compilation-cache"


def enable() -> str | None:
    """Turns the persistent compilation cache on (see the module docstring); returns its directory, or
    ``None`` when it is disabled. Safe to call more than once and before or after JAX initialises."""
    current = jax.config.jax_compilation_cache_dir
    if current:  # JAX_COMPILATION_CACHE_DIR or an explicit jax.config.update: the user's choice
        return current
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in OFF:
        return None
    path = pathlib.Path(setting).expanduser() if setting else default_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        log.warning("compilation cache disabled: cannot create %s (%s); set %s to another directory or 'off'",
                    path, err, ENV)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if jax.config.jax_compilation_cache_max_size < 0:
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return str(path)


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec")
_watches: list[CompileWatch] = []
_listening = False


def _on_duration(event: str, seconds: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        for w in _watches:
            w.seconds += seconds
            w.compiles += event == "/jax/core/compile/backend_compile_duration"
            w.cache_loads += event == "/jax/compilation_cache/cache_retrieval_time_sec"


class CompileWatch:
    """Counts what JAX compiles while the ``with`` block runs (this process, every thread).

    Attributes:
      compiles: XLA backend compilations (programs not found in any cache).
      cache_loads: programs loaded from the persistent cache instead.
      seconds: tracing + lowering + compiling + cache loading, the time a warm run would not spend.
    """

    def __init__(self):
        self.compiles = 0
        self.cache_loads = 0
        self.seconds = 0.0

    def __enter__(self) -> CompileWatch:
        global _listening
        if not _listening:
            jax.monitoring.register_event_duration_secs_listener(_on_duration)
            _listening = True
        _watches.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _watches.remove(self)
