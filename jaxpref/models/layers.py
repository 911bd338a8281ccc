"""Building blocks shared by every family: norms, RoPE, attention, MLPs, embeddings.

Conventions:
  * Parameters are created with :func:`jaxpref.parallel.logical_param` and named with their
    axis order as a suffix: ``d`` embed, ``n`` heads, ``k`` kv heads, ``h`` head_dim, ``f``
    mlp, ``v`` vocab, ``p`` positions (``query_dnh`` is ``[embed, heads, head_dim]``).
  * Dtype policy: parameters are stored in ``config.param_dtype`` and cast to
    ``config.dtype`` at use; norms, RoPE angles, attention logits / softmax and output logits
    are float32.
  * Attention receives a mask *description* (:class:`~jaxpref.models.attention.MaskSpec`) and
    runs on the backend ``config.attention`` names (:mod:`jaxpref.models.attention`); a query
    that sees no key (a padding token) gets exact zeros, finite and ignored downstream.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpref.models.attention import MaskSpec, attend
from jaxpref.models.config import ModelConfig
from jaxpref.models.lora import project
from jaxpref.parallel import constrain, logical_param

F32 = jnp.float32


def init_normal(cfg: ModelConfig, rngs: nnx.Rngs, shape: tuple[int, ...]) -> jax.Array:
    """``N(0, initializer_range)`` in ``param_dtype`` (transformers' init for linears and embeddings)."""
    return cfg.initializer_range * jax.random.normal(rngs.params(), shape, cfg.jnp_param_dtype)


def init_const(cfg: ModelConfig, shape: tuple[int, ...], value: float) -> jax.Array:
    """A constant array in ``param_dtype`` (norm scales, biases)."""
    return jnp.full(shape, value, cfg.jnp_param_dtype)


def _gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


# Module-level functions, so that two equal models hold the same object (graphdefs compare equal, and jitted
# functions keyed on them do not recompile for every new model object).
_ACTIVATIONS = {"silu": jax.nn.silu, "gelu": _gelu_exact, "gelu_tanh": _gelu_tanh}


def activation(name: str):
    """The activation function for a canonical name (see ``ModelConfig.act``)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}")
    return _ACTIVATIONS[name]


# ----------------------------------------------------------------------------------- norms


class RMSNorm(nnx.Module):
    """RMSNorm ``w * x / rms(x)`` over the last axis; with ``plus_one`` (Gemma) ``(1 + w) * x / rms(x)``, w init 0.

    Matches transformers' casting: Llama multiplies the normalised input, cast back to the
    compute dtype, by the weight; Gemma (and OLMo 2, ``f32_product``) multiply in float32 and
    cast the product. ``dim`` is the normalised size (default ``hidden_size``; ``head_dim`` for
    per-head q/k norms, ``H * hd`` for OLMo 2's full-projection norms).
    """

    def __init__(self, cfg: ModelConfig, *, plus_one: bool = False, f32_product: bool = False,
                 dim: int | None = None):
        self.eps, self.plus_one, self.dtype = cfg.norm_eps, plus_one, cfg.jnp_dtype
        self.f32_product = f32_product or plus_one
        init = 0.0 if plus_one else 1.0
        self.scale_d = logical_param(init_const(cfg, (dim or cfg.hidden_size,), init), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(F32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.scale_d[...].astype(F32)
        if self.f32_product:
            return (normed * (1.0 + w if self.plus_one else w)).astype(self.dtype)
        return normed.astype(self.dtype) * w.astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, computed in float32."""

    def __init__(self, cfg: ModelConfig):
        self.eps, self.dtype = cfg.norm_eps, cfg.jnp_dtype
        self.scale_d = logical_param(init_const(cfg, (cfg.hidden_size,), 1.0), ("norm",))
        self.bias_d = logical_param(init_const(cfg, (cfg.hidden_size,), 0.0), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(F32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale_d[...].astype(F32) + self.bias_d[...].astype(F32)).astype(self.dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> RMSNorm | LayerNorm:
    """The family's norm (``FamilyTraits.norm``) over ``dim`` features (default ``hidden_size``)."""
    kind = cfg.traits.norm
    if kind == "layer":
        return LayerNorm(cfg)
    return RMSNorm(cfg, plus_one=kind == "rms_plus_one", f32_product=kind == "rms_f32", dim=dim)


# ----------------------------------------------------------------------------------- RoPE


def rope_sin_cos(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Angles for rotate-half RoPE.

    Args:
      positions: [B, T] int position ids.
      inv_freq: [R/2] float32 inverse frequencies (R = rotary dims).

    Returns:
      (sin, cos), each [B, T, R/2] float32.
    """
    angles = positions.astype(F32)[..., None] * jnp.asarray(inv_freq, F32)
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotates the first ``R = 2 * sin.shape[-1]`` dims of each head, "rotate_half" layout.

    Pairs are ``(j, j + R/2)`` (Hugging Face / GPT-NeoX), not interleaved ``(2j, 2j+1)``;
    dims ``R:`` pass through unchanged (partial rotary).

    Args:
      x: [B, T, N, hd].
      sin, cos: [B, T, R/2] float32.
    """
    half = sin.shape[-1]
    x32 = x.astype(F32)
    x1, x2, rest = x32[..., :half], x32[..., half:2 * half], x32[..., 2 * half:]
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return rotated.astype(x.dtype)


# ----------------------------------------------------------------------------------- attention


class Attention(nnx.Module):
    """Multi-head attention with GQA, optional biases, RoPE and an optional KV cache.

    Parameters: ``query_dnh [embed, heads, head_dim]``, ``key_dkh`` / ``value_dkh``
    ``[embed, kv_heads, head_dim]``, ``out_nhd [heads, head_dim, embed]``, biases
    ``query_bias_nh``, ``key_bias_kh``, ``value_bias_kh``, ``out_bias_d``; with
    ``FamilyTraits.qk_norm`` also ``q_norm`` / ``k_norm``, applied before RoPE, over each head
    (``"head"``: Qwen3, Gemma 3) or over the whole projection (``"full"``: OLMo 2).

    Scores are scaled by ``query_pre_attn_scalar ** -0.5`` when set (Gemma 2/3), else
    ``head_dim ** -0.5``; ``attn_logit_softcap`` travels to the backend in the mask description.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        scalar = cfg.query_pre_attn_scalar if cfg.query_pre_attn_scalar is not None else h
        self.dtype, self.scale, self.backend = cfg.jnp_dtype, scalar ** -0.5, cfg.attention
        self.qk_norm = cfg.traits.qk_norm
        if self.qk_norm is not None:
            full = self.qk_norm == "full"
            self.q_norm = make_norm(cfg, n * h if full else h)
            self.k_norm = make_norm(cfg, k * h if full else h)
        self.query_dnh = logical_param(init_normal(cfg, rngs, (d, n, h)), ("embed", "heads", "head_dim"))
        self.key_dkh = logical_param(init_normal(cfg, rngs, (d, k, h)), ("embed", "kv_heads", "head_dim"))
        self.value_dkh = logical_param(init_normal(cfg, rngs, (d, k, h)), ("embed", "kv_heads", "head_dim"))
        self.out_nhd = logical_param(init_normal(cfg, rngs, (n, h, d)), ("heads", "head_dim", "embed"))
        if cfg.qkv_bias:
            self.query_bias_nh = logical_param(init_const(cfg, (n, h), 0.0), ("heads", "head_dim"))
            self.key_bias_kh = logical_param(init_const(cfg, (k, h), 0.0), ("kv_heads", "head_dim"))
            self.value_bias_kh = logical_param(init_const(cfg, (k, h), 0.0), ("kv_heads", "head_dim"))
        if cfg.out_bias:
            self.out_bias_d = logical_param(init_const(cfg, (d,), 0.0), ("embed",))

    def __call__(
        self,
        x_btd: jax.Array,
        *,
        mask: MaskSpec,
        rope: tuple[jax.Array, jax.Array] | None,
        cache: tuple[jax.Array, jax.Array] | None = None,
        layer: int = 0,
        index: jax.Array | int = 0,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Attends ``x`` to itself, or to the cache after writing ``x``'s keys/values into it.

        Args:
          x_btd: [B, T, D] normalised input in the compute dtype.
          mask: the mask description: queries [B, T], keys [B, S] (S = T without cache, the cache
            length with one).
          rope: (sin, cos) [B, T, R/2] or None (learned positions).
          cache: (k, v) buffers [L, B, S, KV, hd] for *all* layers (written in place under
            donation), or None.
          layer: this layer's index into the cache buffers.
          index: slot offset where this call's T keys/values are written.

        Returns:
          ([B, T, D] output, updated (k, v) buffers or None).
        """
        x = x_btd.astype(self.dtype)
        q = project(self, "query_dnh", "btd,dnh->btnh", x, self.dtype)
        k = project(self, "key_dkh", "btd,dkh->btkh", x, self.dtype)
        v = project(self, "value_dkh", "btd,dkh->btkh", x, self.dtype)
        if hasattr(self, "query_bias_nh"):
            q = q + self.query_bias_nh[...].astype(self.dtype)
            k = k + self.key_bias_kh[...].astype(self.dtype)
            v = v + self.value_bias_kh[...].astype(self.dtype)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.qk_norm == "full":
            q = self.q_norm(q.reshape(*q.shape[:2], -1)).reshape(q.shape)
            k = self.k_norm(k.reshape(*k.shape[:2], -1)).reshape(k.shape)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k_all, v_all = cache
            start = (layer, 0, index, 0, 0)
            k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
            v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
            cache = (k_all, v_all)
            k, v = k_all[layer].astype(self.dtype), v_all[layer].astype(self.dtype)
        o = attend(q, k, v, mask, self.backend, scale=self.scale)  # float32 scores and softmax inside
        out = project(self, "out_nhd", "btnh,nhd->btd", o, self.dtype)
        if hasattr(self, "out_bias_d"):
            out = out + self.out_bias_d[...].astype(self.dtype)
        return out, cache


# ----------------------------------------------------------------------------------- MLPs


class GatedMLP(nnx.Module):
    """``down(act(x gate) * (x up))`` (Llama silu / Gemma gelu-tanh). ``gate_df``, ``up_df``, ``down_fd``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.dtype, self.act = cfg.jnp_dtype, activation(cfg.act)
        self.gate_df = logical_param(init_normal(cfg, rngs, (d, f)), ("embed", "mlp"))
        self.up_df = logical_param(init_normal(cfg, rngs, (d, f)), ("embed", "mlp"))
        self.down_fd = logical_param(init_normal(cfg, rngs, (f, d)), ("mlp", "embed"))
        if cfg.mlp_bias:
            self.gate_bias_f = logical_param(init_const(cfg, (f,), 0.0), ("mlp",))
            self.up_bias_f = logical_param(init_const(cfg, (f,), 0.0), ("mlp",))
            self.down_bias_d = logical_param(init_const(cfg, (d,), 0.0), ("embed",))

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        dt, bias = self.dtype, hasattr(self, "down_bias_d")
        gate = project(self, "gate_df", "...d,df->...f", x_btd, dt)
        up = project(self, "up_df", "...d,df->...f", x_btd, dt)
        if bias:
            gate, up = gate + self.gate_bias_f[...].astype(dt), up + self.up_bias_f[...].astype(dt)
        out = project(self, "down_fd", "...f,fd->...d", self.act(gate) * up, dt)
        return out + self.down_bias_d[...].astype(dt) if bias else out


class MLP(nnx.Module):
    """``down(act(x up + b) + b)`` (GPT-2 gelu_new, GPT-NeoX gelu). ``up_df``, ``down_fd`` (+ biases)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.dtype, self.act = cfg.jnp_dtype, activation(cfg.act)
        self.up_df = logical_param(init_normal(cfg, rngs, (d, f)), ("embed", "mlp"))
        self.down_fd = logical_param(init_normal(cfg, rngs, (f, d)), ("mlp", "embed"))
        if cfg.mlp_bias:
            self.up_bias_f = logical_param(init_const(cfg, (f,), 0.0), ("mlp",))
            self.down_bias_d = logical_param(init_const(cfg, (d,), 0.0), ("embed",))

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        dt, bias = self.dtype, hasattr(self, "down_bias_d")
        h = project(self, "up_df", "...d,df->...f", x_btd, dt)
        h = self.act(h + self.up_bias_f[...].astype(dt) if bias else h)
        out = project(self, "down_fd", "...f,fd->...d", h, dt)
        return out + self.down_bias_d[...].astype(dt) if bias else out


def make_mlp(cfg: ModelConfig, *, rngs: nnx.Rngs) -> GatedMLP | MLP:
    return GatedMLP(cfg, rngs=rngs) if cfg.traits.gated_mlp else MLP(cfg, rngs=rngs)


# ----------------------------------------------------------------------------------- embeddings


class Embedding(nnx.Module):
    """Token embedding ``embedding_vd [vocab, embed]``; ``scale`` multiplies lookups (Gemma sqrt(D))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype = cfg.jnp_dtype
        # Gemma rounds sqrt(D) to the parameter dtype before multiplying (HF does the same).
        self.scale = math.sqrt(cfg.hidden_size) if cfg.traits.scale_embeddings else None
        self.embedding_vd = logical_param(init_normal(cfg, rngs, (cfg.vocab_size, cfg.hidden_size)), ("vocab", "embed"))

    def __call__(self, ids_bt: jax.Array) -> jax.Array:
        """[B, T] int -> [B, T, D] in the compute dtype.

        The lookup reads the table gathered over ``embed`` (as FSDP gathers every weight; ``vocab`` keeps its
        tensor sharding): its gradient is then a local scatter-add of the batch-sharded residual gradient,
        reduce-scattered back. Looked up in the ``embed``-sharded table, the scatter-add needs that gradient
        sharded on D, which GSPMD cannot reach from a batch split over data x fsdp other than by replicating
        it ("Involuntary full rematerialization"; ``tests/test_plan.py``)."""
        table = constrain(self.embedding_vd[...], ("vocab", None))
        x = jnp.take(table, ids_bt, axis=0)
        if self.scale is not None:
            x = x * jnp.asarray(self.scale, table.dtype)
        return x.astype(self.dtype)
