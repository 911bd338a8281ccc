"""Declarative Hugging Face <-> jaxpref parameter maps: rules and the value transforms they use.

Each family declares one :class:`KeyTable` next to its model: a list of :class:`KeyRule`
``(HF name template(s), jaxpref parameter path(s), transform)``. ``{i}`` in a template is the
layer index. The generic loader / exporter in :mod:`jaxpref.models.hf_io` walks the table in
either direction; a rule whose jaxpref parameters do not exist in a model (biases the
config turns off) is skipped, so one table serves every variant of a family.

Transforms know the target jaxpref shapes, so they never need the config: e.g.
``Linear(1)`` turns a PyTorch ``(out, in)`` weight into ``[in, *out]`` by a transpose and a
reshape to the target shape ``[embed, heads, head_dim]``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import numpy as np

Shape = tuple[int, ...]


class Transform:
    """HF tensor <-> one or more jaxpref arrays, given the jaxpref target shapes."""

    def hf_shape(self, shapes: Sequence[Shape]) -> Shape:
        raise NotImplementedError

    def to_jax(self, hf: np.ndarray, shapes: Sequence[Shape]) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def to_hf(self, arrays: Sequence[np.ndarray], shapes: Sequence[Shape]) -> np.ndarray:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Identity(Transform):
    """Same layout on both sides (embeddings, norm scales, output biases)."""

    def hf_shape(self, shapes):
        return tuple(shapes[0])

    def to_jax(self, hf, shapes):
        return (hf,)

    def to_hf(self, arrays, shapes):
        return arrays[0]


@dataclasses.dataclass(frozen=True)
class Reshape(Transform):
    """A flat HF vector <-> a multi-axis jaxpref array (per-head biases ``[heads, head_dim]``)."""

    def hf_shape(self, shapes):
        return (math.prod(shapes[0]),)

    def to_jax(self, hf, shapes):
        return (hf.reshape(shapes[0]),)

    def to_hf(self, arrays, shapes):
        return arrays[0].reshape(-1)


@dataclasses.dataclass(frozen=True)
class Linear(Transform):
    """``torch.nn.Linear`` weight ``(out, in)`` <-> ``[*in, *out]``; the first ``n_in`` jaxpref axes are inputs.

    ``Linear(1)``: q ``(H*hd, D) -> [D, H, hd]``; ``Linear(2)``: o ``(D, H*hd) -> [H, hd, D]``.
    """

    n_in: int = 1

    def hf_shape(self, shapes):
        s = shapes[0]
        return (math.prod(s[self.n_in:]), math.prod(s[: self.n_in]))

    def to_jax(self, hf, shapes):
        return (hf.T.reshape(shapes[0]),)

    def to_hf(self, arrays, shapes):
        s = shapes[0]
        return arrays[0].reshape(math.prod(s[: self.n_in]), -1).T


@dataclasses.dataclass(frozen=True)
class Conv1D(Transform):
    """GPT-2 ``Conv1D`` weight, stored ``(in, out)``: a reshape, no transpose."""

    n_in: int = 1

    def hf_shape(self, shapes):
        s = shapes[0]
        return (math.prod(s[: self.n_in]), math.prod(s[self.n_in:]))

    def to_jax(self, hf, shapes):
        return (hf.reshape(shapes[0]),)

    def to_hf(self, arrays, shapes):
        s = shapes[0]
        return arrays[0].reshape(math.prod(s[: self.n_in]), -1)


@dataclasses.dataclass(frozen=True)
class NeoxQKV(Transform):
    """GPT-NeoX fused ``query_key_value``: rows interleaved *per head* as ``(H, 3, hd)``.

    Weight ``(3*H*hd, D)`` <-> q, k, v ``[D, H, hd]``; bias ``(3*H*hd,)`` <-> ``[H, hd]`` each.
    """

    def hf_shape(self, shapes):
        s = shapes[0]
        return (3 * s[1] * s[2], s[0]) if len(s) == 3 else (3 * s[0] * s[1],)

    def to_jax(self, hf, shapes):
        s = shapes[0]
        if len(s) == 3:  # weight
            d, h, hd = s
            per_head = hf.reshape(h, 3, hd, d)
            return tuple(per_head[:, j].transpose(2, 0, 1) for j in range(3))
        per_head = hf.reshape(s[0], 3, s[1])
        return tuple(per_head[:, j] for j in range(3))

    def to_hf(self, arrays, shapes):
        if len(shapes[0]) == 3:
            d = shapes[0][0]
            return np.stack([a.transpose(1, 2, 0) for a in arrays], axis=1).reshape(-1, d)
        return np.stack(arrays, axis=1).reshape(-1)


@dataclasses.dataclass(frozen=True)
class Gpt2QKV(Transform):
    """GPT-2 fused ``c_attn`` (Conv1D): columns are ``[q | k | v]``, each ``(H, hd)``.

    Weight ``(D, 3*H*hd)`` <-> q, k, v ``[D, H, hd]``; bias ``(3*H*hd,)`` <-> ``[H, hd]`` each.
    """

    def hf_shape(self, shapes):
        s = shapes[0]
        return (s[0], 3 * s[1] * s[2]) if len(s) == 3 else (3 * s[0] * s[1],)

    def to_jax(self, hf, shapes):
        s = shapes[0]
        if len(s) == 3:
            parts = hf.reshape(s[0], 3, s[1], s[2])
            return tuple(parts[:, j] for j in range(3))
        parts = hf.reshape(3, *s)
        return tuple(parts[j] for j in range(3))

    def to_hf(self, arrays, shapes):
        if len(shapes[0]) == 3:
            return np.stack(arrays, axis=1).reshape(shapes[0][0], -1)
        return np.stack(arrays, axis=0).reshape(-1)


@dataclasses.dataclass(frozen=True)
class FusedLinear(Transform):
    """Several ``torch.nn.Linear`` weights stacked along the output rows (Phi-3 ``qkv_proj``, ``gate_up_proj``).

    Weight ``(sum_j out_j, in)`` <-> arrays ``[in, *out_j]`` (q ``[D, H, hd]``, k / v ``[D, KV, hd]``;
    gate / up ``[D, F]``): split on import, concatenated again on export.
    """

    def hf_shape(self, shapes):
        return (sum(math.prod(s[1:]) for s in shapes), shapes[0][0])

    def to_jax(self, hf, shapes):
        bounds = np.cumsum([math.prod(s[1:]) for s in shapes])[:-1]
        return tuple(part.T.reshape(s) for part, s in zip(np.split(hf, bounds, axis=0), shapes, strict=True))

    def to_hf(self, arrays, shapes):
        return np.concatenate([a.reshape(a.shape[0], -1) for a in arrays], axis=1).T


IDENTITY = Identity()


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One HF tensor <-> one or more jaxpref parameters.

    Attributes:
      hf: HF name templates; the first is written on export, all are accepted on import
        (e.g. GPT-NeoX ``embed_out.weight`` / ``lm_head.weight``).
      params: jaxpref parameter paths (dot-separated, ``{i}`` = layer index).
      transform: how values map between the two layouts.
      per_layer: whether the templates contain ``{i}`` (derived).
    """

    hf: tuple[str, ...]
    params: tuple[str, ...]
    transform: Transform = IDENTITY

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf[0]

    def expand(self, num_layers: int) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        """Concrete ``(hf names, param paths)`` for every layer (or once)."""
        if not self.per_layer:
            return [(self.hf, self.params)]
        return [(tuple(h.format(i=i) for h in self.hf), tuple(p.format(i=i) for p in self.params))
                for i in range(num_layers)]


def rule(hf: str | tuple[str, ...], params: str | tuple[str, ...], transform: Transform = IDENTITY) -> KeyRule:
    """Shorthand: ``rule("model.norm.weight", "final_norm.scale_d")``."""
    return KeyRule(hf=(hf,) if isinstance(hf, str) else tuple(hf),
                   params=(params,) if isinstance(params, str) else tuple(params), transform=transform)


@dataclasses.dataclass(frozen=True)
class KeyTable:
    """A family's full map.

    Attributes:
      rules: every parameter except the output head.
      head: the untied output head rule; its HF keys are ignored when embeddings are tied
        (some tied checkpoints still store the duplicate).
      ignore: regexes (full match) for HF buffers that carry no parameters
        (``rotary_emb.inv_freq``, GPT-2 ``attn.bias`` masks).
    """

    rules: tuple[KeyRule, ...]
    head: KeyRule
    ignore: tuple[str, ...] = ()

    def ignored(self, key: str) -> bool:
        return any(re.fullmatch(p, key) for p in self.ignore)

    def all_rules(self, tied: bool) -> tuple[KeyRule, ...]:
        return self.rules if tied else (*self.rules, self.head)
