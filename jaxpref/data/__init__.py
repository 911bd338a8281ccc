"""Preference data: load -> normalise (+ reject bad rows) -> tokenize -> batch -> iterate.

Usage::

    from jaxpref import data

    prefs = data.load_preferences("pairs.jsonl.gz")            # or a hub id; format auto-detected
    print(prefs.rejects.summary())                              # counts per reject reason
    pairs = data.tokenize_pairs(prefs.records, tokenizer,
                                data.TokenizeConfig(max_length=512), rejects=prefs.rejects)
    prefs.rejects.write("rejects.jsonl")
    it = data.batch_iterator(pairs, global_batch_size=64, seed=0, buckets=(128, 256, 512))
    batch = next(it)                                            # PairBatch, [B, 2, T] arrays
    state = it.get_state()                                      # JSON-able; resume with state=
"""

from jaxpref.data.batching import bucket_lengths, choose_bucket, make_batch, pair_batch, sft_batch
from jaxpref.data.formats import (
    FORMATS,
    PRESETS,
    DataFormatConfig,
    PreferenceData,
    PreferenceRecord,
    SFTRecord,
    detect_format,
    format_config,
    load_preferences,
    normalize,
    split_hh,
    transcript_to_messages,
)
from jaxpref.data.iterator import BatchDataset, BatchIterator, batch_iterator
from jaxpref.data.multi_response import PAIR_MODES, DerivedPairs, MultiResponseRecord, derive_pairs
from jaxpref.data.sources import EXTENSIONS, DataError, load_rows
from jaxpref.data.tokenize import (
    TRUNCATION,
    TokenizeConfig,
    TokenizedPairs,
    TokenizedSFT,
    TokenizeStats,
    tokenize_pairs,
    tokenize_sft,
)
from jaxpref.data.validation import REASONS, Reject, RejectLog, check_text

__all__ = [
    # sources: raw rows, file-level errors
    "EXTENSIONS", "DataError", "load_rows",
    # validation: row-level rejects
    "REASONS", "Reject", "RejectLog", "check_text",
    # formats: normalised records
    "FORMATS", "PRESETS", "DataFormatConfig", "PreferenceData", "PreferenceRecord", "SFTRecord",
    "detect_format", "format_config", "load_preferences", "normalize", "split_hh", "transcript_to_messages",
    # multi-response rows (n > 2) and their pairs
    "PAIR_MODES", "DerivedPairs", "MultiResponseRecord", "derive_pairs",
    # tokenize
    "TRUNCATION", "TokenizeConfig", "TokenizedPairs", "TokenizedSFT", "TokenizeStats", "tokenize_pairs",
    "tokenize_sft",
    # batching and iteration
    "bucket_lengths", "choose_bucket", "make_batch", "pair_batch", "sft_batch",
    "BatchDataset", "BatchIterator", "batch_iterator",
]
