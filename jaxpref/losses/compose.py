"""Weighted compositions of registered loss terms (the jaxpref form of TRL's ``loss_type`` + ``loss_weights``).

A composition is a list of terms, each a registered loss with its hparams and a weight. Its value is

    total = Σ_k w_k · Σ_b(loss_k · mask) / Σ_b(denom_k · mask),

i.e. each term is reduced with its own normaliser (pair mean or token mean) and the results are weighted,
exactly as TRL adds ``per_sequence_loss.mean() * loss_weight`` per loss type. Spec entries are a loss
name, a ``Term``, or a mapping ``{"name": ..., "weight": ..., "key": ..., **hparams}``; a mapping whose
name is a preset (``rpo``) expands into its terms, scaled by its weight.

Example::

    comp = compose([{"name": "sigmoid", "beta": 0.1}, {"name": "sft", "weight": 0.5}])
    total, outputs, metrics = comp(inputs, mask)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxpref.losses.registry import (
    BatchArray,
    HParams,
    LossInputs,
    Scalar,
    TermOutput,
    available_presets,
    get,
    get_preset,
    term_sums,
)


@dataclasses.dataclass(frozen=True)
class Term:
    """One weighted term of a composition.

    Attributes:
        name: registered loss name.
        hparams: the loss's hparams record (validated).
        weight: coefficient of the reduced term in the total.
        key: unique name of the term inside the composition (outputs and metrics are keyed by it).
    """

    name: str
    hparams: HParams
    weight: float = 1.0
    key: str = ""


def term(name: str, weight: float = 1.0, key: str = "", **hparams: Any) -> Term:
    """Builds a validated ``Term``; unknown losses raise KeyError, non-applicable hparams TypeError."""
    _check_weight(name, weight)
    return Term(name=name, hparams=get(name).make_hparams(hparams), weight=float(weight), key=key)


def _check_weight(name: str, weight: Any) -> None:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
        raise TypeError(f"term {name!r}: weight must be a finite real number, got {weight!r}")


def _expand(entry: str | Mapping[str, Any] | Term, scale: float) -> list[Term]:
    if isinstance(entry, Term):
        return [dataclasses.replace(entry, weight=entry.weight * scale)]
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, Mapping) or "name" not in entry:
        raise TypeError(f"composition entry must be a loss name, a Term or a mapping with 'name': {entry!r}")
    fields = dict(entry)
    name = fields.pop("name")
    weight = fields.pop("weight", 1.0)
    _check_weight(name, weight)
    if name in available_presets():
        if "key" in fields:
            raise TypeError(f"preset {name!r} expands into several terms and takes no 'key'")
        return [t for sub in get_preset(name)(**fields) for t in _expand(sub, scale * weight)]
    key = fields.pop("key", "")
    return [term(name, weight * scale, key, **fields)]


@dataclasses.dataclass(frozen=True)
class Composition:
    """A weighted sum of loss terms; hashable, so it can be a static argument of ``jax.jit``.

    Call it as ``total, outputs, metrics = composition(inputs, mask=None, denominators=None)``.
    """

    terms: tuple[Term, ...]

    def outputs(self, inputs: LossInputs) -> dict[str, TermOutput]:
        """Runs every term: ``{term key: TermOutput}``."""
        return {t.key: get(t.name)(inputs, t.hparams) for t in self.terms}

    def sums(
        self, outputs: Mapping[str, TermOutput], mask: BatchArray | None = None
    ) -> dict[str, tuple[Scalar, Scalar]]:
        """Per term ``(Σ loss·mask, Σ denom·mask)``: what a micro-batch adds to gradient accumulation."""
        return {key: term_sums(out, mask) for key, out in outputs.items()}

    def total_from_sums(self, sums: Mapping[str, tuple[Scalar, Scalar]]) -> Scalar:
        """``Σ_k w_k · num_k / den_k`` from (possibly accumulated) per-term sums."""
        return sum(t.weight * (sums[t.key][0] / sums[t.key][1]) for t in self.terms)

    def __call__(
        self,
        inputs: LossInputs,
        mask: BatchArray | None = None,
        *,
        denominators: Mapping[str, Scalar] | None = None,
    ) -> tuple[Scalar, dict[str, TermOutput], dict[str, jax.Array]]:
        """Evaluates the composition on a batch.

        Args:
            inputs: the batch's ``LossInputs`` (``[B]`` arrays).
            mask: ``[B]`` bool/0-1 of real (non-padding) examples; None keeps all.
            denominators: optional per-term-key global denominators. For exact gradient accumulation
                pass the full batch's ``Σ denom·mask`` here when evaluating one micro-batch: the
                micro-batch totals then add up to the full-batch total (and so do their gradients).

        Returns:
            ``(total [], {key: TermOutput}, metrics)``. Metrics hold ``loss``, ``loss/<key>`` and every
            aux entry as ``<key>/<aux name>`` (masked mean of ``[B]`` entries), plus the un-prefixed aux
            name taken from the first term that reports it (TRL dashboard names).
        """
        outputs = self.outputs(inputs)
        sums = self.sums(outputs, mask)
        if denominators is not None:
            sums = {key: (num, denominators[key]) for key, (num, _) in sums.items()}
        total = self.total_from_sums(sums)
        metrics: dict[str, jax.Array] = {"loss": total}
        for key, (num, den) in sums.items():
            metrics[f"loss/{key}"] = num / den
        for key, out in outputs.items():
            for name, value in out.aux.items():
                reduced = _masked_mean(value, mask)
                metrics[f"{key}/{name}"] = reduced
                metrics.setdefault(name, reduced)
        return total, outputs, metrics


def _masked_mean(value: jax.Array, mask: BatchArray | None) -> jax.Array:
    value = jnp.asarray(value)
    if value.ndim == 0:
        return value
    if mask is None:
        return jnp.mean(value)
    keep = jnp.asarray(mask).astype(bool)
    return jnp.sum(jnp.where(keep, value, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


def compose(spec: Sequence[str | Mapping[str, Any] | Term] | str | Mapping[str, Any] | Term) -> Composition:
    """Builds a ``Composition`` from a spec (see the module docstring).

    Args:
        spec: a list of entries, or a single entry. Each entry is a loss name, a ``Term`` or a mapping
            ``{"name", "weight" (default 1), "key" (optional), **hparams}``; preset names expand.

    Returns:
        The composition. Duplicate loss names get keys ``name``, ``name_2``, ... unless given a ``key``.

    Raises:
        KeyError: unknown loss or preset name (the message lists the available names).
        TypeError: a hyperparameter that does not apply to its loss, or a bad weight / entry.
        ValueError: an empty spec, duplicate explicit keys or an out-of-range hyperparameter.
    """
    if isinstance(spec, (str, Mapping, Term)):
        spec = [spec]
    terms = [t for entry in spec for t in _expand(entry, 1.0)]
    if not terms:
        raise ValueError("a composition needs at least one term")
    keyed, seen = [], set()
    for t in terms:
        key = t.key or t.name
        if t.key and key in seen:
            raise ValueError(f"duplicate term key {key!r} in composition")
        n = 2
        while key in seen:
            key, n = f"{t.name}_{n}", n + 1
        seen.add(key)
        keyed.append(dataclasses.replace(t, key=key))
    return Composition(tuple(keyed))
