"""Loss records, the name -> loss registry, hyperparameter validation and batch reduction.

Every preference loss in jaxpref is a pure function ``fn(inputs: LossInputs, hp: HParams) -> TermOutput``
of per-sequence ``[B]`` arrays (design.md §3, style R3/R4). It never sees the model, logits or tokens.

Reduction happens once, outside the loss: the batch value of a term is
``sum(loss * mask) / sum(denom * mask)`` (:func:`reduce_term`). Pair-mean losses return ``denom = 1``;
batch-token-mean terms (TRL's ``sft``) return the token counts. Because numerator and denominator are
separate sums, gradient accumulation over micro-batches is exact: sum both across micro-batches, divide
once.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any

import flax.struct
import jax
import jax.numpy as jnp

BatchArray = Annotated[jax.Array, "[B] float32"]
Scalar = Annotated[jax.Array, "[] float32"]

POLICY = ("policy_chosen_logps", "policy_rejected_logps")
REFERENCE = ("reference_chosen_logps", "reference_rejected_logps")
TOKENS = ("chosen_tokens", "rejected_tokens")


@flax.struct.dataclass
class LossInputs:
    """Per-example inputs of every loss. All arrays are ``[B]`` float32 unless noted.

    Attributes:
        policy_chosen_logps: summed response log-probs of the chosen response under the policy.
        policy_rejected_logps: same for the rejected response.
        reference_chosen_logps: summed log-probs under the frozen reference; None for reference-free runs.
        reference_rejected_logps: same for the rejected response.
        chosen_tokens: number of response tokens of the chosen response (EOS included when it is a target).
        rejected_tokens: same for the rejected response.
        votes: preference share α of the chosen response (fraction of raters preferring it), in [0, 1].
        reference_sample_logps: policy log-prob sum of a response sampled from the reference for the same
            prompt (TYPO's unsupervised term).
        reference_sample_tokens: token count of that reference sample.
        bco_delta: ``[]`` running mean of BCO rewards (state kept by the train step, see ``bco_pair``).
    """

    policy_chosen_logps: BatchArray
    policy_rejected_logps: BatchArray
    reference_chosen_logps: BatchArray | None = None
    reference_rejected_logps: BatchArray | None = None
    chosen_tokens: BatchArray | None = None
    rejected_tokens: BatchArray | None = None
    votes: BatchArray | None = None
    reference_sample_logps: BatchArray | None = None
    reference_sample_tokens: BatchArray | None = None
    bco_delta: Scalar | None = None


@flax.struct.dataclass
class TermOutput:
    """What one loss term returns for a batch.

    Attributes:
        loss: ``[B]`` per-example numerator.
        denom: ``[B]`` per-example normaliser (ones for pair-mean losses, token counts for token means).
        aux: metrics, each ``[B]`` (reduced by masked mean) or ``[]``; gradients are stopped.
    """

    loss: BatchArray
    denom: BatchArray
    aux: dict[str, jax.Array]


def pair_mean_output(loss: BatchArray, aux: dict[str, jax.Array]) -> TermOutput:
    """Wraps a per-pair loss whose batch value is the plain mean over examples (``denom = 1``)."""
    return TermOutput(loss=loss, denom=jnp.ones_like(loss), aux=aux)


def reduce_term(out: TermOutput, mask: BatchArray | None = None) -> Scalar:
    """Batch value of a term: ``sum(loss * mask) / sum(denom * mask)``.

    Args:
        out: the term's output.
        mask: ``[B]`` bool or 0/1; False rows (padding examples) are excluded. None keeps every row.

    Returns:
        ``[]`` float32.
    """
    num, den = term_sums(out, mask)
    return num / den


def term_sums(out: TermOutput, mask: BatchArray | None = None) -> tuple[Scalar, Scalar]:
    """``(sum(loss * mask), sum(denom * mask))``, the pieces a micro-batch contributes to accumulation."""
    if mask is None:
        return jnp.sum(out.loss), jnp.sum(out.denom)
    keep = jnp.asarray(mask).astype(bool)
    # where, not multiply: a padded row may hold inf/nan (e.g. zero token counts) and 0 * nan = nan.
    return jnp.sum(jnp.where(keep, out.loss, 0.0)), jnp.sum(jnp.where(keep, out.denom, 0.0))


def require(inputs: LossInputs, loss_name: str, *fields: str) -> None:
    """Raises ValueError naming the loss and the first missing (None) input field."""
    for name in fields:
        if getattr(inputs, name) is None:
            raise ValueError(
                f"loss {loss_name!r} needs LossInputs.{name}, which is None. It requires: {', '.join(fields)}."
            )


_NUMBER_TYPES = {"float": numbers.Real, "int": numbers.Integral, "bool": bool, "str": str}


@dataclasses.dataclass(frozen=True, kw_only=True)
class HParams:
    """Base of every loss's frozen hyperparameter record; checks field types on construction.

    Subclasses add fields and override ``__post_init__`` (calling ``super().__post_init__()``) to check
    ranges. Records are hashable, so a loss and its hparams can be static arguments of ``jax.jit``.
    """

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            want = _NUMBER_TYPES.get(str(f.type))
            value = getattr(self, f.name)
            bad_bool = isinstance(value, bool) and want is not bool
            if want is not None and (bad_bool or not isinstance(value, want)):
                raise TypeError(f"hyperparameter {f.name!r} must be {f.type}, got {value!r}")


def check_positive(name: str, value: float) -> None:
    """ValueError unless ``value > 0``."""
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_range(name: str, value: float, lo: float, hi: float, *, lo_open=False, hi_open=False) -> None:
    """ValueError unless ``value`` lies in the interval [lo, hi] with the given open ends."""
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value}")


LossFn = Callable[[LossInputs, HParams], TermOutput]


@dataclasses.dataclass(frozen=True)
class RegisteredLoss:
    """A registered loss: call it as ``loss(inputs, hp=None)``; ``hp=None`` uses the defaults.

    Attributes:
        name: registry name.
        fn: the pure loss function (already wrapped with input and hparam checks).
        hparams_cls: its frozen hyperparameter dataclass.
        requires: input fields that must not be None (further ones may depend on hparams).
        hints: extra advice shown when a given non-applicable hyperparameter is passed.
    """

    name: str
    fn: Callable[..., TermOutput]
    hparams_cls: type[HParams]
    requires: tuple[str, ...]
    hints: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False, compare=False)

    def __call__(self, inputs: LossInputs, hp: HParams | None = None) -> TermOutput:
        return self.fn(inputs, hp)

    def make_hparams(self, values: Mapping[str, Any] | HParams | None = None, **kwargs: Any) -> HParams:
        """Builds the hparams from a mapping and/or keywords; rejects keys this loss does not take."""
        if isinstance(values, HParams):
            if kwargs:
                values = dataclasses.replace(values, **kwargs)
            return self._check_instance(values)
        merged = {**(values or {}), **kwargs}
        valid = sorted(f.name for f in dataclasses.fields(self.hparams_cls))
        for key in merged:
            if key not in valid:
                hint = self.hints.get(key, "")
                close = difflib.get_close_matches(key, valid, n=1)
                hint = hint or (f" Did you mean {close[0]!r}?" if close else "")
                raise TypeError(f"loss {self.name!r} does not take hyperparameter {key!r}; valid keys: {valid}.{hint}")
        try:
            return self.hparams_cls(**merged)
        except (TypeError, ValueError) as err:
            raise type(err)(f"loss {self.name!r}: {err}") from None

    def _check_instance(self, hp: HParams) -> HParams:
        if type(hp) is not self.hparams_cls:
            raise TypeError(f"loss {self.name!r} takes {self.hparams_cls.__name__}, got {type(hp).__name__}")
        return hp


_LOSSES: dict[str, RegisteredLoss] = {}
_PRESETS: dict[str, Callable[..., list[dict[str, Any]]]] = {}


def register(
    name: str,
    hparams_cls: type[HParams],
    *,
    requires: Sequence[str] = POLICY,
    hints: Mapping[str, str] | None = None,
) -> Callable[[LossFn], Callable[..., TermOutput]]:
    """Decorator that registers ``fn(inputs, hp) -> TermOutput`` under ``name``.

    The returned function accepts ``hp=None`` (defaults), checks the hparams type and that every field in
    ``requires`` is present, then calls ``fn``.

    Args:
        name: registry name (unique across losses and presets).
        hparams_cls: the loss's frozen hparams dataclass.
        requires: ``LossInputs`` fields that must not be None.
        hints: per non-applicable hparam key, a sentence appended to the error (e.g. where it belongs).
    """

    def decorate(fn: LossFn) -> Callable[..., TermOutput]:
        if name in _LOSSES or name in _PRESETS:
            raise ValueError(f"loss {name!r} is already registered")

        @functools.wraps(fn)
        def checked(inputs: LossInputs, hp: HParams | None = None) -> TermOutput:
            hp = hparams_cls() if hp is None else entry._check_instance(hp)
            require(inputs, name, *requires)
            return fn(inputs, hp)

        entry = RegisteredLoss(name, checked, hparams_cls, tuple(requires), dict(hints or {}))
        _LOSSES[name] = entry
        return checked

    return decorate


def register_preset(name: str) -> Callable[[Callable[..., list]], Callable[..., list]]:
    """Registers a composition helper: a function of keyword hparams returning a composition spec."""

    def decorate(fn: Callable[..., list]) -> Callable[..., list]:
        if name in _LOSSES or name in _PRESETS:
            raise ValueError(f"{name!r} is already registered")
        _PRESETS[name] = fn
        return fn

    return decorate


def get(name: str) -> RegisteredLoss:
    """The registered loss called ``name``; KeyError listing the available names otherwise."""
    try:
        return _LOSSES[name]
    except KeyError:
        extra = f" (composition presets: {available_presets()})" if name in _PRESETS else ""
        raise KeyError(f"unknown loss {name!r}{extra}; available losses: {available()}") from None


def get_preset(name: str) -> Callable[..., list[dict[str, Any]]]:
    """The composition preset called ``name``; KeyError listing presets otherwise."""
    try:
        return _PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; available presets: {available_presets()}") from None


def available() -> list[str]:
    """Sorted names of the registered losses."""
    return sorted(_LOSSES)


def available_presets() -> list[str]:
    """Sorted names of the registered composition presets."""
    return sorted(_PRESETS)


def make_hparams(name: str, values: Mapping[str, Any] | HParams | None = None, **kwargs: Any) -> HParams:
    """Hparams for loss ``name`` from a mapping/keywords; non-applicable keys raise TypeError."""
    return get(name).make_hparams(values, **kwargs)
