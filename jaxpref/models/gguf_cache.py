"""An on-disk cache of converted GGUF files: the tokenizer, and the dequantized weights of small models.

Reading a GGUF is slow in Python: ``gguf.GGUFReader`` parses every metadata field element by element
(the 49,152 tokens and merges of SmolLM2 take ~8 s), and transformers' tokenizer converter parses the
file a second time. A script that loads a GGUF model and its tokenizer paid that three times, ~25 s
before its first step. The first load now stores what it converted, and later loads read that:

* the tokenizer as ``tokenizer.json`` + ``tokenizer_config.json`` (``save_pretrained``; reloaded with
  ``PreTrainedTokenizerFast.from_pretrained``, which tokenizes identically: ``tests/test_gguf_cache.py``);
* ``config.json`` + ``model.safetensors`` (float32, as :func:`~jaxpref.models.gguf_io.read_gguf_tensors`
  returns them) when that is at most ``MAX_TENSOR_BYTES`` (2 GiB; larger models are re-read from the
  GGUF, whose quantized form is what keeps them small on disk).

An entry is keyed by the file (resolved path, size, modification time), by the source of
:mod:`jaxpref.models.gguf_io` (a change of the conversion invalidates every entry) and by the
transformers version (its tokenizer converter). Entries are written to a temporary directory and
renamed into place, so a killed process never leaves a half entry. Location, in order:
``JAXPREF_GGUF_CACHE`` (a directory, or ``off`` / ``0`` / ``false`` / ``none`` to disable), else
``$XDG_CACHE_HOME/jaxpref/gguf`` (``~/.cache/...``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile

import numpy as np

log = logging.getLogger(__name__)

ENV = "JAXPREF_GGUF_CACHE"
OFF = ("off", "0", "false", "none", "no")
MAX_TENSOR_BYTES = 2 << 30
TOKENIZER_DIR, TENSORS_DIR = "tokenizer", "tensors"
NO_TOKENIZER = "no_tokenizer"  # marker: the file has no tokenizer metadata


def cache_root() -> pathlib.Path | None:
    """The cache directory, or ``None`` when ``JAXPREF_GGUF_CACHE`` disables it."""
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in OFF:
        return None
    if setting:
        return pathlib.Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "jaxpref" / "gguf"


def entry_key(path: str | os.PathLike) -> str:
    """Hex key of a GGUF file's entry: the file's identity, the converter's source, transformers' version."""
    import transformers

    from jaxpref.models import gguf_io

    path = pathlib.Path(path).resolve()
    st = path.stat()
    h = hashlib.sha256()
    h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}\0".encode())
    h.update(pathlib.Path(gguf_io.__file__).read_bytes())
    return h.hexdigest()[:32]


def _entry(path) -> pathlib.Path | None:
    root = cache_root()
    return None if root is None else root / entry_key(path)


def _publish(build, final: pathlib.Path) -> None:
    """Runs ``build(tmp_dir)`` and renames the result to ``final`` (atomic; a lost race keeps the other's)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        build(tmp)
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _writable(fn, what: str, path) -> None:
    try:
        fn()
    except OSError as err:  # a read-only or full cache must not stop a load
        log.warning("GGUF cache: could not store the %s of %s (%s); set %s=off or another directory",
                    what, path, err, ENV)


def tokenizer(path: str | os.PathLike, convert):
    """The tokenizer of ``path``: from the cache, or ``convert(path)`` (stored for next time)."""
    entry = _entry(path)
    if entry is None:
        return convert(path)
    where = entry / TOKENIZER_DIR
    if (where / NO_TOKENIZER).is_file():
        return None
    if (where / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(where))
    tok = convert(path)

    def build(tmp: pathlib.Path) -> None:
        if tok is None:
            (tmp / NO_TOKENIZER).touch()
        else:
            tok.save_pretrained(str(tmp))

    _writable(lambda: _publish(build, where), "tokenizer", path)
    return tok


def tensors(path: str | os.PathLike, read) -> tuple[dict, dict[str, np.ndarray]]:
    """``(hf_config, state_dict)`` of ``path``: from the cache, or ``read(path)`` (stored when at most
    ``MAX_TENSOR_BYTES``)."""
    from safetensors.numpy import load_file, save_file

    entry = _entry(path)
    if entry is None:
        return read(path)
    where = entry / TENSORS_DIR
    if (where / "model.safetensors").is_file():
        return json.loads((where / "config.json").read_text()), load_file(str(where / "model.safetensors"))
    config, state_dict = read(path)
    if sum(v.nbytes for v in state_dict.values()) <= MAX_TENSOR_BYTES:
        def build(tmp: pathlib.Path) -> None:
            save_file(state_dict, str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")

        _writable(lambda: _publish(build, where), "weights", path)
    return config, state_dict
