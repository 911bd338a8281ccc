"""The decoder-only transformer every family specialises (see :mod:`jaxpref.models.base`).

One pre-norm block (``attn_norm -> attention``, ``mlp_norm -> MLP``, sequential or parallel
residual) and one model skeleton (embedding [+ learned positions] -> blocks -> final norm
-> unembedding). Family differences are data in :class:`ModelConfig` and its
:class:`~jaxpref.models.config.FamilyTraits`; family subclasses only add their Hugging Face
key table, so there is a single forward pass to test and optimise.

Parameter tree (``[...]`` = only when the config asks for it)::

    embed.embedding_vd            [vocab, embed]
    [position_pd]                 [positions, embed]         (GPT-2)
    layers.{i}.attn_norm.scale_d [.bias_d]
    layers.{i}.attn.{query_dnh, key_dkh, value_dkh, out_nhd} [+ biases]
    layers.{i}.mlp_norm.scale_d [.bias_d]
    layers.{i}.mlp.{[gate_df], up_df, down_fd} [+ biases]
    final_norm.scale_d [.bias_d]
    [lm_head_dv]                  [embed, vocab]             (untied)

With ``scan_layers`` the ``layers.{i}.*`` subtrees are one block whose parameters are stacked on a
leading ``layers`` axis (``layers.attn.query_dnh [L, embed, heads, head_dim]``) and the layers run
under ``lax.scan`` (:mod:`jaxpref.models.layer_stack` converts between the two layouts).
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpref.models import layers, lora
from jaxpref.models.attention import MaskSpec, check_backend
from jaxpref.models.attention.mask import soft_cap
from jaxpref.models.base import KVCache, ModelOutput
from jaxpref.models.config import REMAT_POLICIES, Family, ModelConfig, rope_inv_freq
from jaxpref.models.hf_keys import KeyTable
from jaxpref.models.layer_stack import stack_modules
from jaxpref.parallel import constrain, logical_param

# logical axes of the residual stream [B, T, D]: examples over the batch axes, the model dimension whole
RESIDUAL = ("batch", "length", None)


class Block(nnx.Module):
    """Decoder layer ``x + attn(norm x)`` then ``+ mlp(norm x)`` (or both from x: parallel residual).

    ``FamilyTraits.norm_layout`` places the norms: "pre" as above; "sandwich" (Gemma 2/3) also
    normalises each branch's output, ``x + post_norm(f(norm x))``; "post" (OLMo 2) only that,
    ``x + post_norm(f(x))``. Per-layer setting: whether the layer is local
    (:meth:`ModelConfig.layer_is_local`): a local layer attends within ``sliding_window`` and,
    when the model passes one RoPE table per layer kind (``{"global": ..., "local": ...}``,
    Gemma 3), uses the local one. A scanned stack of mixed layers passes the kind as a traced
    flag instead (``local=`` of :meth:`__call__`).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, layer: int = 0):
        self.parallel_residual, layout = cfg.parallel_residual, cfg.traits.norm_layout
        self.local, self.window, self.softcap = cfg.layer_is_local(layer), cfg.sliding_window, cfg.attn_logit_softcap
        if layout != "post":
            self.attn_norm = layers.make_norm(cfg)
            self.mlp_norm = layers.make_norm(cfg)
        self.attn = layers.Attention(cfg, rngs=rngs)
        self.mlp = layers.make_mlp(cfg, rngs=rngs)
        if layout != "pre":
            self.attn_post_norm = layers.make_norm(cfg)
            self.mlp_post_norm = layers.make_norm(cfg)

    def _branch(self, f, pre: str, post: str, x):
        x = getattr(self, pre)(x) if hasattr(self, pre) else x
        out = f(x)
        return (getattr(self, post)(out[0]), *out[1:]) if hasattr(self, post) else out

    def _attend(self, local: bool, attn: layers.Attention, x, cache, *, mask, rope, layer, index):
        """The attention branch of a local or global layer (``local`` static)."""
        mask = mask.replace(sliding_window=self.window if local else None, softcap=self.softcap)
        if isinstance(rope, dict):
            rope = rope["local" if local else "global"]
        return attn(x, mask=mask, rope=rope, cache=cache, layer=layer, index=index)

    def __call__(self, x_btd, *, mask, rope, cache=None, layer=0, index=0, local=None):
        """[B, T, D] -> ([B, T, D], updated cache buffers); see :meth:`layers.Attention.__call__`.

        ``local``: None = this block's own kind; a traced bool scalar (scanned mixed stacks) runs
        the local or the global attention under ``lax.cond``: both compile once, the norms and the
        MLP stay outside the branches, and the backward keeps about one branch's residuals (JAX
        shares residual slots of equal shape between branches; ``tests/test_scan_layers.py``).
        """
        with lora.layer_scope(layer):  # LoRA adapter dropout (training steps only): one key per layer
            return self._call(x_btd, cache, local, mask=mask, rope=rope, layer=layer, index=index)

    def _call(self, x_btd, cache, local, *, mask, rope, layer, index):
        kw = dict(mask=mask, rope=rope, layer=layer, index=index)
        local = self.local if local is None else local

        def attn(x):
            if not isinstance(local, jax.Array):
                return self._attend(bool(local), self.attn, x, cache, **kw)
            graphdef, state = nnx.split(self.attn)
            branch = lambda kind: lambda s, x, c: self._attend(kind, nnx.merge(graphdef, s), x, c, **kw)  # noqa: E731
            return jax.lax.cond(local, branch(True), branch(False), state, x, cache)

        h, cache = self._branch(attn, "attn_norm", "attn_post_norm", x_btd)
        mlp = lambda x: (self.mlp(x),)  # noqa: E731
        if self.parallel_residual:
            return constrain(x_btd + h + self._branch(mlp, "mlp_norm", "mlp_post_norm", x_btd)[0], RESIDUAL), cache
        x_btd = x_btd + h
        return constrain(x_btd + self._branch(mlp, "mlp_norm", "mlp_post_norm", x_btd)[0], RESIDUAL), cache


def _remat(fn, policy: str):
    """``nnx.remat`` of one layer under a :data:`~jaxpref.models.config.REMAT_POLICIES` policy."""
    return nnx.remat(fn, policy=getattr(jax.checkpoint_policies, REMAT_POLICIES[policy]))


def scan_blocks(blocks: Block, x_btd, *, mask, rope, kv=None, index=0, remat: bool = False, remat_policy="full",
                local=None):
    """Runs stacked layers (:func:`~jaxpref.models.layer_stack.stack_modules`) with ``lax.scan``.

    One traced layer whatever the depth, so compile time stays flat in L (``bench/compile_time.py``).
    With ``remat`` the scanned body is ``jax.checkpoint``-ed under ``remat_policy``: each layer keeps
    what the policy saves and recomputes the rest in the backward pass, as in the unrolled loop.

    Args:
      blocks: a :class:`Block` whose parameters have a leading ``[L]`` axis.
      x_btd: [B, T, D] input of the first layer.
      mask, rope, index: as for :meth:`Block.__call__` (shared by every layer).
      kv: (k, v) cache buffers [L, B, S, KV, hd] or None. They travel in the scan's carry and layer
        ``i`` writes its slot range of slice ``i`` in place, as the unrolled loop does (no per-layer
        copy of the cache).
      local: None when every layer is of one kind (the stacked block's own), else [L] bool, the kind of
        each layer (Gemma 2/3: sliding-window and global layers), scanned with the parameters: each
        step picks its layer's window and RoPE table (:meth:`Block.__call__`).

    Returns:
      ([B, T, D] output of the last layer, updated (k, v) buffers or None).
    """
    graphdef, state = nnx.split(blocks)
    num_layers = jax.tree.leaves(state)[0].shape[0]

    def body(carry, xs):
        x, cache = carry
        layer_state, layer, kind = xs
        x, cache = nnx.merge(graphdef, layer_state)(x, mask=mask, rope=rope, cache=cache, layer=layer, index=index,
                                                    local=kind)
        return (x, cache), None

    if remat:  # prevent_cse=False: inside a scan, XLA cannot merge the recomputation away anyway
        body = jax.checkpoint(body, policy=getattr(jax.checkpoint_policies, REMAT_POLICIES[remat_policy]),
                              prevent_cse=False)
    xs = (state, jnp.arange(num_layers, dtype=jnp.int32), None if local is None else jnp.asarray(local, bool))
    (x_btd, kv), _ = jax.lax.scan(body, (x_btd, kv), xs)
    return x_btd, kv


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token inside its run of equal segment ids: [B, T] -> [B, T] int32.

    ``[[1, 1, 1, 2, 2, 0]] -> [[0, 1, 2, 0, 1, 0]]``; left padding ``[[0, 0, 1, 1]] -> [[0, 1, 0, 1]]``.
    """
    t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None]
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)


class CausalLM(nnx.Module):
    """A causal LM following the :class:`jaxpref.models.base.CausalLM` contract.

    Subclasses set :attr:`FAMILIES` (the config families they implement) and :attr:`HF_KEYS`.
    """

    FAMILIES: ClassVar[tuple[Family, ...]] = ()
    HF_KEYS: ClassVar[KeyTable | None] = None

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        if self.FAMILIES and config.family not in self.FAMILIES:
            raise ValueError(f"{type(self).__name__} implements {[f.value for f in self.FAMILIES]}, "
                             f"not {config.family.value}")
        check_backend(config.attention)  # e.g. splash on CPU: a config error before anything compiles
        self.config = config
        self.embed = layers.Embedding(config, rngs=rngs)
        if config.learned_positions:
            shape = (config.max_position_embeddings, config.hidden_size)
            self.position_pd = logical_param(layers.init_normal(config, rngs, shape), (None, "embed"))
        blocks = [Block(config, rngs=rngs, layer=i) for i in range(config.num_layers)]
        # stacked from the same draws: a scanned model equals the unrolled one built from the same seed
        self.layers = stack_modules(blocks) if config.scan_layers else nnx.List(blocks)
        self.final_norm = layers.make_norm(config)
        if not config.tie_word_embeddings:
            self.lm_head_dv = logical_param(layers.init_normal(config, rngs, (config.hidden_size, config.vocab_size)),
                                            ("embed", "vocab"))

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        return_logits: bool = False,
        right_padded: bool = False,
        branch_ids: jax.Array | None = None,
    ) -> ModelOutput:
        """Forward pass.

        Args:
          input_ids: [B, T] int token ids.
          positions: [B, T] int position ids. Default: restart at 0 at every segment start
            (:func:`segment_positions`), offset by the number of non-padding slots already
            in ``cache`` (right for one sequence per row, left-padded or not).
          segment_ids: [B, T] int, 0 = padding; tokens attend causally within their own
            segment. Default: all ones.
          cache: a :class:`KVCache`; this call's keys/values are written at ``cache.index``
            (the caller keeps ``index + T <= S``; out-of-range writes are clamped by XLA).
          return_logits: also compute [B, T, V] float32 logits.
          right_padded: the caller promises one sequence per row at slots and positions
            ``0 .. n-1`` then padding (:attr:`MaskSpec.right_padded`; lets cuDNN serve the mask).
          branch_ids: [B, T] int shared-prompt pairs (``data.share_prompt``): 0 = a segment's prompt,
            b > 0 = a response that attends to branch 0 and itself only (see
            :class:`~jaxpref.models.attention.MaskSpec`); needs explicit ``positions``, no ``cache``.

        Returns:
          :class:`ModelOutput` with ``hidden`` [B, T, D] (compute dtype), ``logits`` and ``cache``.
        """
        cfg = self.config
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if branch_ids is not None and (cache is not None or positions is None):
            raise ValueError("branch_ids (shared-prompt rows) need explicit positions and no KV cache")
        if segment_ids is None:
            segment_ids = jnp.ones_like(input_ids)
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        if positions is None:
            positions = segment_positions(segment_ids)
            if cache is not None:
                positions = positions + jnp.sum(cache.segment_ids != 0, axis=1, dtype=jnp.int32)[:, None]
        positions = jnp.asarray(positions, jnp.int32)

        x = constrain(self.embed(input_ids), RESIDUAL)
        rope = None
        if cfg.learned_positions:
            x = x + jnp.take(self.position_pd[...], positions, axis=0).astype(x.dtype)
        else:
            rope = layers.rope_sin_cos(positions, rope_inv_freq(cfg))
            if cfg.rope_local_theta is not None or cfg.rope_linear_factor != 1.0:  # Gemma 3: one table per kind
                rope = {"global": rope, "local": layers.rope_sin_cos(positions, rope_inv_freq(cfg, local=True))}

        if cache is None:
            kv, index = None, 0
            mask = MaskSpec.self_attention(segment_ids, positions, branch_ids, sliding_window=cfg.sliding_window,
                                           right_padded=right_padded)
        else:
            kv, index = (cache.k, cache.v), cache.index
            kv_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, index))
            kv_positions = jax.lax.dynamic_update_slice(cache.positions, positions, (0, index))
            mask = MaskSpec(segment_ids, positions, kv_segments, kv_positions, sliding_window=cfg.sliding_window)

        if cfg.scan_layers:
            local = [cfg.layer_is_local(i) for i in range(cfg.num_layers)]
            x, kv = scan_blocks(self.layers, x, mask=mask, rope=rope, kv=kv, index=index, remat=cfg.remat,
                                remat_policy=cfg.remat_policy, local=local if len(set(local)) > 1 else None)
        else:
            for i, block in enumerate(self.layers):
                def run(block, x, mask, rope, kv, index, layer=i):
                    return block(x, mask=mask, rope=rope, cache=kv, layer=layer, index=index)

                x, kv = (_remat(run, cfg.remat_policy) if cfg.remat else run)(block, x, mask, rope, kv, index)

        hidden = constrain(self.final_norm(x), RESIDUAL)
        logits = self.logits(hidden) if return_logits else None
        if cache is not None:
            cache = KVCache(k=kv[0], v=kv[1], segment_ids=kv_segments, positions=kv_positions,
                            index=cache.index + input_ids.shape[1])
        return ModelOutput(hidden=hidden, logits=logits, cache=cache)

    def unembedding(self) -> tuple[jax.Array, str]:
        """The output projection: ``([D, V], "dv")`` for a head, ``([V, D], "vd")`` when tied."""
        if self.config.tie_word_embeddings:
            return self.embed.embedding_vd[...], "vd"
        return self.lm_head_dv[...], "dv"

    def logits(self, hidden_btd: jax.Array) -> jax.Array:
        """[B, T, D] final hidden states -> [B, T, V] float32 logits (float32 accumulation), soft-capped
        by ``final_logit_softcap`` when set (Gemma 2)."""
        matrix, layout = self.unembedding()
        eq = "btd,dv->btv" if layout == "dv" else "btd,vd->btv"
        logits = jnp.einsum(eq, hidden_btd, matrix.astype(hidden_btd.dtype), preferred_element_type=jnp.float32)
        return soft_cap(logits, self.config.final_logit_softcap)

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty cache: k/v [L, B, S, KV, hd] zeros (compute dtype by default), segments 0, index 0."""
        cfg = self.config
        shape = (cfg.num_layers, batch_size, max_length, cfg.num_kv_heads, cfg.head_dim)
        dtype = jnp.dtype(dtype) if dtype is not None else cfg.jnp_dtype
        zeros_bs = jnp.zeros((batch_size, max_length), jnp.int32)
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), segment_ids=zeros_bs,
                       positions=zeros_bs, index=jnp.zeros((), jnp.int32))


def count_params(model: nnx.Module) -> int:
    """Number of parameter elements (works on ``nnx.eval_shape`` models too)."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return int(sum(np.prod(x.shape) for x in leaves))
