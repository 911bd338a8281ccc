"""A deterministic, checkpointable, process-sharded batch iterator on top of ``grain``.

:class:`BatchDataset` is a ``grain.MapDataset`` whose element ``step`` is the *process-local*
part of global batch number ``step``: a pure function of ``(data, config, step)``. Hence

* **determinism**: the same seed gives the same batches, on any machine;
* **resume**: the iterator state is the next step (``{"next_index": k}`` inside grain's JSON
  state); restoring it yields exactly the batches an uninterrupted run would have seen;
* **process sharding**: global batch ``step`` holds ``global_batch_size`` rows; process ``p``
  of ``P`` gets rows ``[p * B, (p + 1) * B)`` with ``B = global_batch_size / P``, so the
  processes' slices are disjoint and together form the global batch. ``T`` is the bucket of the
  longest sequence in the *global* batch, so every process builds the same shapes (as
  ``jax.make_array_from_process_local_data`` requires).

Epoch plan: each epoch permutes the rows with ``numpy.random.default_rng([seed, epoch])``
(identity without ``shuffle``) and cuts the permutation into global batches. The last partial
batch is dropped (``drop_remainder``) or padded with masked rows. Optional **length grouping**
(``length_grouping = k > 1``): within each window of ``k`` consecutive global batches the rows
are sorted by length before cutting, and the epoch's batch order is then shuffled, so a batch
holds sequences of similar length (less padding, smaller buckets) while the plan stays a pure
function of the seed.

Optional **packing** (``packing=PackSpec(...)``, pairs only): batches are
:class:`~jaxpref.types.PackedPairBatch` (several sequences per row, one static ``[R, T]``
shape) and each epoch's plan is cut by :func:`jaxpref.data.packing.plan_groups` so every
process's ``B`` pairs fit its ``R`` rows (a pair that does not fit opens the next batch); the
plan is still a pure function of the seed.

Optional **shared prompts** (``share_prompt=True``, or ``PackSpec.share_prompt`` when packing): each
pair is one ``[prompt | chosen | rejected]`` row (:class:`~jaxpref.types.PackedPairBatch` with
``branch_ids``); unpacked, one pair per row, padded to :attr:`BatchDataset.shared_buckets` (``buckets``
doubled beyond the largest until the longest shared row fits: a bounded ladder of shapes).

**Reference samples** (TYPO): given ``ref_samples`` (a
:class:`jaxpref.training.reference_samples.ReferenceSamples`), each pair batch also carries
``batch.ref_samples``, bucketed like the pairs from the *global* batch's longest prompt + sample
(same shapes on every process). They do not change the plan or the fingerprint.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
from typing import Any

import grain
import numpy as np

from jaxpref.data import packing as packing_lib
from jaxpref.data.batching import _default_buckets, choose_bucket, make_batch
from jaxpref.data.tokenize import TokenizedPairs, TokenizedSFT
from jaxpref.types import PackedPairBatch, PairBatch, SFTBatch


class BatchDataset(grain.MapDataset):
    """Global step -> this process's :class:`~jaxpref.types.PairBatch` (or ``SFTBatch``)."""

    def __init__(
        self,
        data: TokenizedPairs | TokenizedSFT,
        *,
        global_batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        drop_remainder: bool = True,
        buckets: tuple[int, ...] | None = None,
        length_grouping: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        ref_samples: Any = None,
        packing: packing_lib.PackSpec | None = None,
        share_prompt: bool = False,
    ):
        """See the module docstring.

        Args:
          data: tokenised pairs or SFT examples.
          global_batch_size: rows per global batch (all processes together).
          seed: seeds the per-epoch permutation.
          shuffle: permute rows each epoch (else file order).
          num_epochs: epochs to run; None = forever.
          drop_remainder: drop the last partial global batch of each epoch (else pad it).
          buckets: allowed sequence lengths ``T``; None: powers of two up to the longest.
          length_grouping: sort rows by length within windows of this many global batches
            (0 or 1: off).
          process_index: this process (default ``jax.process_index()``).
          process_count: number of processes (default ``jax.process_count()``).
          ref_samples: optional reference samples of ``data``'s pairs (anything with ``seq_lengths``
            [N], ``buckets`` and ``batch(indices, seq_len=, batch_size=)``, e.g.
            :class:`~jaxpref.training.reference_samples.ReferenceSamples`), attached to each batch.
          packing: pack pairs into :class:`~jaxpref.types.PackedPairBatch` rows of this shape
            (``rows`` per process; ``buckets`` and ``length_grouping`` then do not apply).
          share_prompt: unpacked shared-prompt rows (module docstring); packed ones come from
            ``packing.share_prompt``.
        """
        super().__init__()
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                             f"process_count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        n = len(data)
        steps = n // global_batch_size if drop_remainder else -(-n // global_batch_size)
        if steps == 0:
            raise ValueError(f"{n} examples make no global batch of {global_batch_size} "
                             f"(drop_remainder={drop_remainder})")
        self.data = data
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.seed, self.shuffle, self.num_epochs = int(seed), shuffle, num_epochs
        self.drop_remainder, self.length_grouping = drop_remainder, int(length_grouping)
        self.process_index, self.process_count = process_index, process_count
        self.buckets = tuple(buckets) if buckets is not None else _default_buckets(data)
        if ref_samples is not None and (isinstance(data, TokenizedSFT) or len(ref_samples.seq_lengths) != n):
            raise ValueError(f"ref_samples cover {len(ref_samples.seq_lengths)} prompts; they need the "
                             f"{n} tokenised pairs of data")
        self.ref_samples = ref_samples
        self.steps_per_epoch = steps
        self._lengths = data.lengths().max(axis=1) if n else np.zeros(0, np.int32)  # [N]
        if n and self._lengths.max() > max(self.buckets):
            raise ValueError(f"longest sequence {self._lengths.max()} exceeds the largest bucket {max(self.buckets)}")
        self.packing = packing
        self.packing_left_out: dict[int, int] = {}  # epoch -> pairs the packed plan could not place
        if packing is not None:
            self._check_packing(packing)
        self.share_prompt = bool(share_prompt) and packing is None
        self.shared_buckets: tuple[int, ...] = ()
        if share_prompt and packing is None:
            if not isinstance(data, TokenizedPairs) or ref_samples is not None:
                raise ValueError("share_prompt applies to preference pairs without reference samples")
            self._shared = packing_lib.shared_lengths(data) if n else np.zeros(0, np.int32)
            buckets, longest = list(self.buckets), int(self._shared.max()) if n else 1
            while buckets[-1] < longest:
                buckets.append(2 * buckets[-1])
            self.shared_buckets = tuple(buckets)

    def _check_packing(self, packing: packing_lib.PackSpec) -> None:
        if not isinstance(self.data, TokenizedPairs):
            raise ValueError("packing applies to preference pairs only, not SFT examples")
        if self.length_grouping > 1:
            raise ValueError("packing and length_grouping are exclusive (packing already removes the padding)")
        if self.ref_samples is not None:
            raise ValueError("packing does not carry reference samples (ref_samples); use padded batches")
        if self.local_batch_size % packing.groups:
            raise ValueError(f"per-process batch size {self.local_batch_size} is not divisible by "
                             f"packing groups {packing.groups}")
        longest = int(packing_lib.item_lengths(self.data, packing).max()) if len(self.data) else 0
        if longest > packing.seq_len:
            what = "shared-prompt row" if packing.share_prompt else "sequence"
            raise ValueError(f"longest {what} {longest} exceeds the packed row length {packing.seq_len}")

    def __len__(self) -> int:
        return sys.maxsize if self.num_epochs is None else self.steps_per_epoch * self.num_epochs

    def __str__(self) -> str:
        return (f"BatchDataset(n={len(self.data)}, global_batch_size={self.global_batch_size}, seed={self.seed}, "
                f"process={self.process_index}/{self.process_count})")

    @functools.cached_property
    def fingerprint(self) -> str:
        """Hash of what determines the global batches (not the process layout: resuming on a different
        number of processes yields the same global batches)."""
        h = hashlib.sha256(json.dumps([
            len(self.data), self.global_batch_size, self.seed, self.shuffle, self.drop_remainder,
            self.buckets, self.length_grouping, self.num_epochs]).encode())
        if self.packing is not None:
            spec = dataclasses.asdict(self.packing)
            if not spec["share_prompt"]:  # the fingerprint of runs saved before the field existed
                spec.pop("share_prompt")
            h.update(json.dumps(["packing", spec]).encode())
        if self.share_prompt:
            h.update(b"share_prompt")
        h.update(np.ascontiguousarray(self.data.row).tobytes())
        h.update(np.ascontiguousarray(self._lengths).tobytes())
        return h.hexdigest()[:16]

    @functools.lru_cache(maxsize=4)  # noqa: B019 (a few epochs; the dataset lives as long as its iterators)
    def epoch_plan(self, epoch: int) -> np.ndarray:
        """[steps_per_epoch, global_batch_size] int64 row positions of each global batch (-1 = pad)."""
        n, g = len(self.data), self.global_batch_size
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        if self.packing is not None:
            return self._packed_plan(epoch, order)
        full = n // g * g
        main, rest = order[:full], order[full:]
        if self.length_grouping > 1:
            w = self.length_grouping * g
            main = np.concatenate([c[np.argsort(-self._lengths[c], kind="stable")]
                                   for c in np.split(main, range(w, full, w))]) if full else main
        batches = main.reshape(-1, g)
        if self.length_grouping > 1 and self.shuffle:
            batches = batches[np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))]
        if len(rest) and not self.drop_remainder:
            batches = np.concatenate([batches, np.concatenate([rest, np.full(g - len(rest), -1)])[None]])
        return batches

    def _packed_plan(self, epoch: int, order: np.ndarray) -> np.ndarray:
        """Packable global batches of ``process_count x groups`` groups; process ``p``'s slice is its
        ``groups`` groups interleaved (slot ``q * groups + j`` = group ``j``'s ``q``-th pair)."""
        k, p, steps = self.packing.groups, self.process_count, self.steps_per_epoch
        per_group = self.local_batch_size // k
        plan, left_out = packing_lib.plan_groups(packing_lib.item_lengths(self.data, self.packing), order, self.packing,
                                                 pairs_per_group=per_group, num_groups=steps * p * k)
        self.packing_left_out[epoch] = left_out
        return plan.reshape(steps, p, k, per_group).transpose(0, 1, 3, 2).reshape(steps, -1)

    def global_indices(self, step: int) -> np.ndarray:
        """[global_batch_size] row positions (into ``data``) of global batch ``step`` (-1 = pad)."""
        if not 0 <= step < len(self):
            raise IndexError(f"step {step} out of range [0, {len(self)})")
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.epoch_plan(epoch)[k]

    def __getitem__(self, step: Any) -> PairBatch | SFTBatch | PackedPairBatch:
        if isinstance(step, slice):
            return self.slice(step)
        rows = self.global_indices(int(step))  # [G]
        b = self.local_batch_size
        local = rows[self.process_index * b:(self.process_index + 1) * b]
        if self.packing is not None:
            return packing_lib.pack_pairs(self.data, local, self.packing, first_slot=self.process_index * b)
        real = rows[rows >= 0]
        if self.share_prompt:
            seq_len = choose_bucket(int(self._shared[real].max()) if len(real) else 1, self.shared_buckets)
            return packing_lib.shared_pair_batch(self.data, local, seq_len, first_slot=self.process_index * b)
        seq_len = choose_bucket(int(self._lengths[real].max()) if len(real) else 1, self.buckets)
        batch = make_batch(self.data, local, seq_len=seq_len, batch_size=b)
        if self.ref_samples is not None:
            longest = int(self.ref_samples.seq_lengths[real].max()) if len(real) else 1
            batch = batch.replace(ref_samples=self.ref_samples.batch(
                local, seq_len=choose_bucket(longest, self.ref_samples.buckets), batch_size=b))
        return batch


class BatchIterator:
    """Iterator over a :class:`BatchDataset` with a JSON-able, validated state.

    ``get_state()`` returns ``{"grain": <grain iterator state>, "fingerprint": ...}``;
    ``set_state`` refuses a state saved for different data or settings.
    """

    def __init__(self, dataset: BatchDataset, read_options: grain.ReadOptions | None = None):
        self.dataset = dataset
        # Batches are built from in-memory arrays: threads only add GIL contention (grain's advice).
        self._it = iter(dataset.to_iter_dataset(read_options or grain.ReadOptions(num_threads=0,
                                                                                  prefetch_buffer_size=0)))

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> PairBatch | SFTBatch:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._it.get_state(), "fingerprint": self.dataset.fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self.dataset.fingerprint:
            raise ValueError(f"iterator state was saved for different data or settings (fingerprint "
                             f"{state.get('fingerprint')!r}, this dataset {self.dataset.fingerprint!r})")
        self._it.set_state(state["grain"])


def batch_iterator(data: TokenizedPairs | TokenizedSFT, *, global_batch_size: int,
                   state: dict[str, Any] | None = None, read_options: grain.ReadOptions | None = None,
                   **kw: Any) -> BatchIterator:
    """A :class:`BatchIterator` over ``BatchDataset(data, global_batch_size=..., **kw)``.

    Args:
      data: tokenised pairs or SFT examples.
      global_batch_size: rows per global batch.
      state: a previous ``get_state()`` to resume from.
      read_options: grain read options (default: no threads, no prefetch).
      **kw: the other :class:`BatchDataset` arguments (seed, shuffle, buckets, process_index...).
    """
    it = BatchIterator(BatchDataset(data, global_batch_size=global_batch_size, **kw), read_options)
    if state is not None:
        it.set_state(state)
    return it
