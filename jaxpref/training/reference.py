"""Reference strategies: live frozen params, precomputed (cached) log-probs, or none.

Which loss terms need reference log-probs at all is read from each registered loss's ``requires``
(:func:`reference_terms`), so a new reference-free loss needs no list to be edited here.

Precomputed reference log-probs are computed once with a forward-only pass (larger batches
than training), saved to ``<cache_dir>/<key>.npz`` and reused by every later run and resume
whose key matches. The key is a SHA-256 over three fingerprints:

* the reference *parameters* (shapes, dtypes and a strided sample of every leaf's values),
* the *tokenised data* (every prompt / chosen / rejected id and the pad id), which covers the
  dataset, the tokenizer, the chat template and the truncation policy at once,
* the log-prob settings (format version).

A mismatch is a cache miss (never a wrong hit). Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
from collections.abc import Callable, Iterable

import jax
import numpy as np

from jaxpref.losses import Composition, get
from jaxpref.losses.registry import REFERENCE

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def params_fingerprint(params, samples_per_leaf: int = 4096) -> str:
    """Cheap, content-sensitive hash of a parameter pytree (shape, dtype, strided values)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        arr = np.asarray(jax.device_get(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str((arr.shape, str(arr.dtype))).encode())
        flat = arr.reshape(-1)
        stride = max(1, flat.size // samples_per_leaf)
        h.update(np.ascontiguousarray(flat[::stride]).astype(np.float32).tobytes())
    return h.hexdigest()


def tokens_fingerprint(arrays: Iterable[Iterable[np.ndarray]], pad_id: int) -> str:
    """Hash of tokenised sequences (list of per-example id arrays, for each field)."""
    h = hashlib.sha256(str(pad_id).encode())
    for field in arrays:
        for ids in field:
            a = np.asarray(ids, np.int32)
            h.update(len(a).to_bytes(4, "little"))
            h.update(a.tobytes())
    return h.hexdigest()


def cache_key(params_fp: str, data_fp: str) -> str:
    return hashlib.sha256(f"v{CACHE_VERSION}|{params_fp}|{data_fp}".encode()).hexdigest()[:32]


class ReferenceLogpCache:
    """Precomputed ``[N, 2]`` reference log-prob sums of a tokenised pair dataset.

    Attributes:
      logps: [N, 2] float32, row ``i`` = pair ``i`` of the tokenised dataset (chosen first).
      computed: True if this process computed them (False when loaded from the cache).
      path: the cache file.
    """

    def __init__(self, logps: np.ndarray, path: pathlib.Path, computed: bool):
        self.logps = np.asarray(logps, np.float32)
        self.path = path
        self.computed = computed

    def lookup(self, positions: np.ndarray) -> np.ndarray:
        """[B] pair positions (-1 for padding rows) -> [B, 2] log-probs (0 on padding rows)."""
        positions = np.asarray(positions)
        out = self.logps[np.clip(positions, 0, len(self.logps) - 1)]
        return np.where((positions >= 0)[:, None], out, 0.0).astype(np.float32)

    @classmethod
    def load_or_compute(
        cls,
        cache_dir: str | os.PathLike,
        key: str,
        n_pairs: int,
        compute: Callable[[], np.ndarray],
        meta: dict | None = None,
    ) -> ReferenceLogpCache:
        """Returns the cached log-probs for ``key`` or computes, saves and returns them.

        Logs ``reference log-probs: loaded ... (no recomputation)`` or ``... computed ...``; the
        ``computed`` attribute records which happened.
        """
        directory = pathlib.Path(cache_dir).expanduser()
        path = directory / f"{key}.npz"
        if path.is_file():
            try:
                with np.load(path) as f:
                    logps = f["logps"]
                if logps.shape == (n_pairs, 2):
                    log.info("reference log-probs: loaded %d pairs from cache %s (no recomputation)", n_pairs, path)
                    return cls(logps, path, computed=False)
                log.warning("reference cache %s has shape %s, expected (%d, 2): recomputing",
                            path, logps.shape, n_pairs)
            except (OSError, ValueError, KeyError) as err:
                log.warning("reference cache %s is unreadable (%s): recomputing", path, err)
        logps = np.asarray(compute(), np.float32)
        if logps.shape != (n_pairs, 2):
            raise ValueError(f"reference precompute returned shape {logps.shape}, expected ({n_pairs}, 2)")
        if jax.process_index() == 0:
            directory.mkdir(parents=True, exist_ok=True)
            tmp = directory / f".{key}.{os.getpid()}.tmp.npz"
            np.savez(tmp, logps=logps, meta=json.dumps(meta or {}))
            tmp.replace(path)
        log.info("reference log-probs: computed %d pairs, cached at %s", n_pairs, path)
        return cls(logps, path, computed=True)


def sync_reference(ref_params, params, alpha: float):
    """TR-DPO reference update ``ref <- alpha * policy + (1 - alpha) * ref`` (Gorbatovski et al. 2024)."""
    return jax.tree.map(lambda r, p: (alpha * p + (1.0 - alpha) * r).astype(r.dtype), ref_params, params)


def reference_terms(composition: Composition) -> tuple[str, ...]:
    """Keys of the terms of ``composition`` that read reference log-probs: those whose registered
    ``requires`` (:func:`jaxpref.losses.register`) names a ``LossInputs.reference_*_logps`` field."""
    return tuple(t.key for t in composition.terms if set(REFERENCE) & set(get(t.name).requires))
