"""Two layouts of a model's decoder layers, and the generic conversion between them.

* **unrolled** (``scan_layers=False``): ``layers.{i}.attn.query_dnh`` of shape ``[D, H, hd]``, one
  subtree per layer (an ``nnx.List`` of blocks run by a Python loop);
* **stacked** (``scan_layers=True``): ``layers.attn.query_dnh`` of shape ``[L, D, H, hd]``, one block
  whose parameters carry a leading logical axis ``layers`` (run by ``lax.scan``, so the program, and
  its compile time, no longer grow with depth).

Both hold the same numbers: layer ``i`` of the stacked array is layer ``i``'s array. Everything that
names parameters per layer (Hugging Face / GGUF / llama2.c key tables, Orbax checkpoints) keeps
working in both layouts through the helpers here, so no family needs layout-specific code:

* :func:`stack_layers` / :func:`unstack_layers` convert any pytree (an ``nnx.State`` of ``Param``\\ s,
  an optax state holding param-shaped trees, abstract ``ShapeDtypeStruct`` restore targets with
  their shardings) by rewriting every mapping node that has a ``layers`` entry;
* :func:`layer_layout` tells which layout a tree (or an Orbax checkpoint's metadata tree) uses;
* :func:`unrolled_paths` maps the per-layer *path strings* the key tables expand to
  (``layers.3.attn.query_dnh``) onto a model's actual parameters (``(layers.attn.query_dnh, 3)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

LAYERS = "layers"  # the module attribute / state key of the decoder layers, and their logical axis name
STACKED, UNROLLED = "stacked", "unrolled"


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _is_index(key) -> bool:
    return isinstance(key, int) or (isinstance(key, str) and key.isdigit())


def _layers_node_layout(node) -> str | None:
    if not isinstance(node, Mapping) or not len(node):
        return None
    return UNROLLED if all(_is_index(k) for k in node) else STACKED


def layer_layout(tree) -> str | None:
    """``"stacked"``, ``"unrolled"`` or None (no ``layers`` entry) for the first ``layers`` mapping in ``tree``.

    Works on ``nnx.State``, nested dicts and Orbax tree metadata (``item_metadata(step)[item]``).
    """
    tree = getattr(tree, "tree", tree)  # orbax TreeMetadata
    if isinstance(tree, Mapping):
        if LAYERS in tree and (found := _layers_node_layout(tree[LAYERS])) is not None:
            return found
        children = tree.values()
    elif isinstance(tree, (list, tuple)):
        children = tree
    elif hasattr(tree, "__dataclass_fields__"):
        children = [getattr(tree, f) for f in tree.__dataclass_fields__]
    else:
        return None
    for child in children:
        if (found := layer_layout(child)) is not None:
            return found
    return None


# ----------------------------------------------------------------------------------- leaves


def _stack_sharding(sharding, ndim: int):
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        return NamedSharding(sharding.mesh, P(None, *spec))
    return sharding


def _unstack_sharding(sharding, ndim: int):
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        return NamedSharding(sharding.mesh, P(*spec[1:]))
    return sharding


def _stack_leaf(*xs):
    x = xs[0]
    if _is_var(x):
        axes = x.get_metadata().get("out_sharding")
        value = _stack_leaf(*(v.get_raw_value() for v in xs))
        return x.copy(value, **({"out_sharding": (LAYERS, *axes)} if axes else {}))
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(xs), *x.shape), x.dtype,
                                    sharding=_stack_sharding(getattr(x, "sharding", None), len(x.shape)))
    if isinstance(x, np.ndarray | np.generic):
        return np.stack(xs)
    return jnp.stack(xs)


def _index_leaf(x, i: int):
    if _is_var(x):
        axes = x.get_metadata().get("out_sharding")
        value = _index_leaf(x.get_raw_value(), i)
        return x.copy(value, **({"out_sharding": tuple(axes[1:])} if axes and axes[0] == LAYERS else {}))
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype,
                                    sharding=_unstack_sharding(getattr(x, "sharding", None), len(x.shape)))
    return x[i]


def _leading_size(tree) -> int:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError("cannot unstack layers: the stacked layers subtree has no arrays")
    return int(np.shape(leaves[0])[0])


# ----------------------------------------------------------------------------------- trees


def _raw(node):
    """An ``nnx.State``'s underlying dict: nested levels of a State are plain dicts in its pytree."""
    return node.raw_mapping if isinstance(node, nnx.State) else node


def _rebuild(node, layers_value):
    """``node`` with its ``layers`` entry replaced, same container type (State or dict)."""
    items = dict(_raw(node))
    items[LAYERS] = _raw(layers_value)
    return type(node)(items, _copy=False) if isinstance(node, nnx.State) else type(node)(items)


def stack_layer_trees(per_layer: Sequence[Any]):
    """``L`` same-structured per-layer trees -> one tree with every leaf stacked on a new axis 0.

    ``nnx.Variable`` leaves get ``"layers"`` prepended to their logical axes (``out_sharding``),
    ``ShapeDtypeStruct`` leaves a replicated leading dimension in their sharding.
    """
    return jax.tree.map(_stack_leaf, *per_layer, is_leaf=_is_var)


def layer_tree(stacked, i: int):
    """Layer ``i`` of a stacked tree (the inverse of :func:`stack_layer_trees`)."""
    return jax.tree.map(lambda x: _index_leaf(x, i), stacked, is_leaf=_is_var)


def _convert(tree, to: str):
    def has_layers(x) -> bool:
        return isinstance(x, Mapping) and LAYERS in x and _layers_node_layout(x[LAYERS]) is not None

    def one(node):
        if not has_layers(node):
            return node
        layers = node[LAYERS]
        if _layers_node_layout(layers) == to:
            return node
        if to == STACKED:
            keys = sorted(layers, key=int)
            if [int(k) for k in keys] != list(range(len(keys))):
                raise ValueError(f"cannot stack layers {keys}: expected 0..{len(keys) - 1}")
            return _rebuild(node, stack_layer_trees([layers[k] for k in keys]))
        n = _leading_size(layers)
        return _rebuild(node, {i: _raw(layer_tree(layers, i)) for i in range(n)})

    return jax.tree.map(one, tree, is_leaf=has_layers)


def stack_layers(tree):
    """Unrolled -> stacked layout: every ``{layers: {0: t0, ..., L-1: t_L-1}}`` becomes ``{layers: stack(t)}``.

    Trees already stacked (or without layers) come back unchanged; see the module docstring.
    """
    return _convert(tree, STACKED)


def unstack_layers(tree):
    """Stacked -> unrolled layout (the inverse of :func:`stack_layers`)."""
    return _convert(tree, UNROLLED)


def to_layout(tree, layout: str):
    """``tree`` in ``layout`` (``"stacked"`` or ``"unrolled"``)."""
    if layout not in (STACKED, UNROLLED):
        raise ValueError(f"layout must be {STACKED!r} or {UNROLLED!r}, got {layout!r}")
    return _convert(tree, layout)


def stack_modules(blocks: Sequence[nnx.Module]) -> nnx.Module:
    """One module of ``blocks[0]``'s type whose parameters are the blocks' parameters stacked on axis 0.

    Layer ``i`` of the result computes exactly what ``blocks[i]`` computes (same numbers), so a
    scanned model built from the same random draws equals its unrolled twin.
    """
    graphdef, _ = nnx.split(blocks[0])
    return nnx.merge(graphdef, stack_layer_trees([nnx.state(b) for b in blocks]))


# ----------------------------------------------------------------------------------- path strings


def unrolled_paths(paths: Mapping[str, tuple[int, ...]], num_layers: int) -> dict[str, tuple[str, int | None]]:
    """Per-layer path names -> where they live in a model's flat state.

    Args:
      paths: the model's flat parameter paths (dot-separated) -> shapes.
      num_layers: L.

    Returns:
      ``{unrolled path: (actual path, layer index or None)}``: ``layers.3.mlp.up_df ->
      (layers.mlp.up_df, 3)`` for a stacked model, ``(layers.3.mlp.up_df, None)`` for an unrolled one;
      other parameters map to themselves with None.
    """
    out: dict[str, tuple[str, int | None]] = {}
    prefix = LAYERS + "."
    for path, shape in paths.items():
        head, _, rest = path.partition(".") if path.startswith(prefix) else (path, "", "")
        if head != LAYERS or _is_index(rest.partition(".")[0]):
            out[path] = (path, None)
            continue
        if not shape or shape[0] != num_layers:
            raise ValueError(f"stacked parameter {path} has shape {tuple(shape)}; expected a leading layers "
                             f"axis of {num_layers}")
        for i in range(num_layers):
            out[f"{prefix}{i}.{rest}"] = (path, i)
    return out
