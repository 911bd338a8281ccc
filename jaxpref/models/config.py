"""``ModelConfig``: one frozen description of every supported decoder-only architecture.

A config says *what* the network is (family, sizes, RoPE, biases, ...) and *how* it runs
(parameter and compute dtypes, rematerialisation). It converts to and from Hugging Face
``config.json`` dictionaries, accepting both transformers v4 spellings (``rope_theta``,
``rope_scaling``, ``rotary_pct``, ``rotary_emb_base``, ``torch_dtype``) and v5 spellings
(``rope_parameters``, ``dtype``); it always writes v5. Anything this library cannot compute
exactly raises :class:`UnsupportedConfigError` instead of being silently ignored.

Family traits that never vary inside a family (norm kind, gated MLP, learned positions,
embedding scaling) are derived from :attr:`ModelConfig.family` via :data:`FAMILY_TRAITS`;
everything that varies between checkpoints of one family is a field.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np


class UnsupportedConfigError(ValueError):
    """A Hugging Face config uses a feature jaxpref does not implement."""


class Family(enum.StrEnum):
    """Architecture family; the value is the Hugging Face ``model_type``."""

    LLAMA = "llama"
    MISTRAL = "mistral"
    QWEN2 = "qwen2"
    GEMMA = "gemma"
    GPT2 = "gpt2"
    GPT_NEOX = "gpt_neox"
    QWEN3 = "qwen3"
    GEMMA2 = "gemma2"
    GEMMA3 = "gemma3_text"
    OLMO2 = "olmo2"
    PHI3 = "phi3"


@dataclasses.dataclass(frozen=True)
class FamilyTraits:
    """What is fixed for every checkpoint of a family.

    Attributes:
      norm: "rms" (``w * x/rms``, the product in the compute dtype), "rms_f32" (OLMo 2: the
        product in float32), "rms_plus_one" (Gemma, ``(1 + w) * x/rms`` in float32) or "layer".
      gated_mlp: ``down(act(gate x) * up x)`` instead of ``down(act(up x))``.
      learned_positions: absolute position embeddings (GPT-2) instead of RoPE.
      scale_embeddings: multiply token embeddings by ``sqrt(hidden_size)`` (Gemma).
      architecture: the Hugging Face ``architectures`` entry for export.
      qk_norm: RMSNorm of queries and keys before RoPE: None, "head" (over each head's
        ``head_dim``: Qwen3, Gemma 3) or "full" (over the whole ``H * hd`` projection: OLMo 2).
      norm_layout: where the block's norms sit: "pre" (``x + f(norm x)``), "sandwich"
        (``x + norm(f(norm x))``: Gemma 2/3) or "post" (``x + norm(f(x))``: OLMo 2).
    """

    norm: str
    gated_mlp: bool
    learned_positions: bool
    scale_embeddings: bool
    architecture: str
    qk_norm: str | None = None
    norm_layout: str = "pre"


FAMILY_TRAITS: dict[Family, FamilyTraits] = {
    Family.LLAMA: FamilyTraits("rms", True, False, False, "LlamaForCausalLM"),
    Family.MISTRAL: FamilyTraits("rms", True, False, False, "MistralForCausalLM"),
    Family.QWEN2: FamilyTraits("rms", True, False, False, "Qwen2ForCausalLM"),
    Family.GEMMA: FamilyTraits("rms_plus_one", True, False, True, "GemmaForCausalLM"),
    Family.GPT2: FamilyTraits("layer", False, True, False, "GPT2LMHeadModel"),
    Family.GPT_NEOX: FamilyTraits("layer", False, False, False, "GPTNeoXForCausalLM"),
    Family.QWEN3: FamilyTraits("rms", True, False, False, "Qwen3ForCausalLM", qk_norm="head"),
    Family.GEMMA2: FamilyTraits("rms_plus_one", True, False, True, "Gemma2ForCausalLM", norm_layout="sandwich"),
    Family.GEMMA3: FamilyTraits("rms_plus_one", True, False, True, "Gemma3ForCausalLM", qk_norm="head",
                                norm_layout="sandwich"),
    Family.OLMO2: FamilyTraits("rms_f32", True, False, False, "Olmo2ForCausalLM", qk_norm="full", norm_layout="post"),
    Family.PHI3: FamilyTraits("rms", True, False, False, "Phi3ForCausalLM"),
}

# Families whose layers may alternate sliding-window ("sliding_attention") and global ("full_attention").
LAYER_TYPES = ("sliding_attention", "full_attention")
_WINDOW_FAMILIES = (Family.MISTRAL, Family.GEMMA2, Family.GEMMA3, Family.PHI3)

# HF activation name -> canonical name. "gelu_tanh" is the tanh approximation under all its names.
_ACTIVATIONS = {
    "silu": "silu", "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}
# canonical name -> the spelling each family writes on export.
_EXPORT_ACT = {Family.GPT2: {"gelu_tanh": "gelu_new"}, Family.GEMMA: {"gelu_tanh": "gelu_pytorch_tanh"},
               Family.GPT_NEOX: {"gelu_tanh": "gelu_new"}, Family.GEMMA2: {"gelu_tanh": "gelu_pytorch_tanh"},
               Family.GEMMA3: {"gelu_tanh": "gelu_pytorch_tanh"}}
_DTYPES = ("float32", "bfloat16", "float16")

# ``ModelConfig.remat_policy`` -> the ``jax.checkpoint`` policy's name in ``jax.checkpoint_policies``.
REMAT_POLICIES = {"full": "nothing_saveable", "dots_no_batch": "dots_with_no_batch_dims_saveable",
                  "dots": "dots_saveable"}

# ``ModelConfig.attention`` values (:mod:`jaxpref.models.attention.select` resolves them).
ATTENTION_BACKENDS = ("auto", "xla", "blocked", "cudnn", "splash", "pallas_gpu")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 RoPE frequency scaling (HF ``rope_type: "llama3"``).

    Attributes:
      factor: divide low frequencies by this (8 for Llama 3.1).
      low_freq_factor: wavelengths above ``original_max_position_embeddings / low_freq_factor``
        are fully scaled.
      high_freq_factor: wavelengths below ``original_max_position_embeddings / high_freq_factor``
        are kept; in between they are interpolated.
      original_max_position_embeddings: the pre-training context length.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.factor <= 0 or self.high_freq_factor <= self.low_freq_factor or self.low_freq_factor <= 0:
            raise ValueError(f"invalid llama3 rope scaling {self}: need factor > 0 and "
                             "high_freq_factor > low_freq_factor > 0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture plus dtype policy of a decoder-only LM (HF source names in brackets).

    Attributes:
      family: architecture family [model_type].
      vocab_size: V [vocab_size].
      hidden_size: D [hidden_size, n_embd].
      intermediate_size: MLP width I [intermediate_size, n_inner].
      num_layers: L [num_hidden_layers, n_layer].
      num_heads: H query heads [num_attention_heads, n_head].
      num_kv_heads: KV heads; H % KV == 0 (grouped-query attention) [num_key_value_heads].
      head_dim: hd, may differ from D / H (Gemma) [head_dim].
      norm_eps: RMSNorm / LayerNorm epsilon [rms_norm_eps, layer_norm_eps, layer_norm_epsilon].
      rope_theta: RoPE base [rope_parameters.rope_theta, rope_theta, rotary_emb_base].
      rope_scaling: Llama 3.1 frequency scaling or None [rope_parameters.rope_type == "llama3"].
      partial_rotary_factor: fraction of ``head_dim`` that is rotated (GPT-NeoX) [rotary_pct].
      sliding_window: each query sees at most this many keys (itself included) (Mistral).
      qkv_bias: biases on the q/k/v projections [attention_bias, Qwen2: always].
      out_bias: bias on the attention output projection [attention_bias for Llama / NeoX].
      mlp_bias: biases on the MLP projections [mlp_bias].
      tie_word_embeddings: the unembedding is the token embedding [tie_word_embeddings].
      act: "silu", "gelu" (erf) or "gelu_tanh" [hidden_act, activation_function].
      max_position_embeddings: P [max_position_embeddings, n_positions].
      parallel_residual: ``x + attn(ln1 x) + mlp(ln2 x)`` (GPT-NeoX) [use_parallel_residual].
      param_dtype: storage dtype of parameters [dtype, torch_dtype].
      dtype: compute dtype of activations and matmuls; norms, softmax and logits stay float32.
      remat: rematerialise each layer in the backward pass (``nnx.remat``).
      remat_policy: what a rematerialised layer keeps from its forward (:data:`REMAT_POLICIES`):
        ``full`` keeps only the layer input and recomputes everything; ``dots_no_batch`` keeps
        the outputs of the weight matmuls (q/k/v/o, MLP) and recomputes attention and the
        elementwise work; ``dots`` keeps every matmul output, attention scores included.
      attention: the attention backend, ``auto | xla | blocked | cudnn | splash | pallas_gpu``
        (:mod:`jaxpref.models.attention`); how attention is computed, not what it computes.
      scan_layers: store the layers' parameters stacked on a leading ``layers`` axis and run them with
        ``lax.scan`` (compile time flat in depth); same numbers as the unrolled loop
        (:mod:`jaxpref.models.layer_stack`). Not written to ``config.json``: a runtime choice.
      initializer_range: std of the normal initialiser for random init [initializer_range].
      bos_token_id / eos_token_id / pad_token_id: carried for export and generation.
      attn_logit_softcap: attention scores become ``c * tanh(s / c)`` (Gemma 2) [attn_logit_softcapping].
      final_logit_softcap: output logits become ``c * tanh(z / c)`` (Gemma 2), in the forward
        pass, generation and the chunked log-probs alike [final_logit_softcapping].
      query_pre_attn_scalar: scores are scaled by ``query_pre_attn_scalar ** -0.5`` instead of
        ``head_dim ** -0.5`` (Gemma 2/3) [query_pre_attn_scalar].
      layer_types: per layer "sliding_attention" (local: ``sliding_window`` applies) or
        "full_attention" (global); None = every layer is local iff ``sliding_window`` is set
        [layer_types; Gemma 2 default: even layers local; Gemma 3: ``sliding_window_pattern``].
      rope_local_theta: RoPE base of the local layers, None = ``rope_theta`` (Gemma 3)
        [rope_parameters.sliding_attention.rope_theta, rope_local_base_freq].
      rope_linear_factor: linear RoPE scaling of the global layers, positions divided by it
        (Gemma 3 4B+) [rope_parameters.full_attention: rope_type "linear", factor].
    """

    family: Family
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    partial_rotary_factor: float = 1.0
    sliding_window: int | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    act: str = "silu"
    max_position_embeddings: int = 2048
    parallel_residual: bool = False
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: bool = False
    remat_policy: str = "full"
    attention: str = "auto"
    scan_layers: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None
    rope_linear_factor: float = 1.0

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen normalisation)
        try:
            set_("family", Family(self.family))
        except ValueError:
            raise UnsupportedConfigError(f"unknown model family {self.family!r}; supported: "
                                         f"{[f.value for f in Family]}") from None
        for name in ("param_dtype", "dtype"):
            value = jnp.dtype(getattr(self, name)).name
            if value not in _DTYPES:
                raise ValueError(f"{name}={value!r}: must be one of {_DTYPES}")
            set_(name, value)
        if self.act not in ("silu", "gelu", "gelu_tanh"):
            set_("act", _canonical_act(self.act))
        if isinstance(self.eos_token_id, list):
            set_("eos_token_id", tuple(self.eos_token_id))
        if self.layer_types is not None:
            set_("layer_types", tuple(self.layer_types))
        if isinstance(self.rope_scaling, Mapping):
            set_("rope_scaling", RopeScaling(**self.rope_scaling))
        self._validate()

    def _validate(self):
        f = self.family
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}: must be one of {sorted(REMAT_POLICIES)}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention={self.attention!r}: must be one of {list(ATTENTION_BACKENDS)}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        if self.sliding_window is not None and (f not in _WINDOW_FAMILIES or self.sliding_window <= 0):
            raise UnsupportedConfigError(f"sliding_window={self.sliding_window} is only supported (positive) for "
                                         f"{', '.join(w.value for w in _WINDOW_FAMILIES)}, not {f.value}")
        self._validate_gemma2_features()
        if self.parallel_residual and f != Family.GPT_NEOX:
            raise UnsupportedConfigError(f"parallel_residual is a gpt_neox feature, not {f.value}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.partial_rotary_factor != 1.0 and f not in (Family.GPT_NEOX, Family.PHI3):
            raise UnsupportedConfigError(f"partial rotary is a gpt_neox feature, not {f.value}")
        if not self.learned_positions and (self.rotary_dim < 2 or self.rotary_dim % 2):
            raise ValueError(f"rotary_dim = int(head_dim * partial_rotary_factor) = {self.rotary_dim} must be even "
                             "and >= 2")
        if self.rope_scaling is not None and f not in (Family.LLAMA, Family.MISTRAL, Family.QWEN2, Family.QWEN3):
            raise UnsupportedConfigError(f"llama3 rope scaling is not supported for {f.value}")
        if f in (Family.GPT2, Family.GPT_NEOX):
            if self.num_kv_heads != self.num_heads or self.head_dim * self.num_heads != self.hidden_size:
                raise UnsupportedConfigError(f"{f.value} needs num_kv_heads == num_heads and "
                                             "head_dim * num_heads == hidden_size")
            if f == Family.GPT2 and not (self.qkv_bias and self.out_bias and self.mlp_bias):
                raise UnsupportedConfigError("gpt2 always has biases (qkv_bias, out_bias, mlp_bias)")
            if f == Family.GPT_NEOX and (self.qkv_bias != self.out_bias or not self.mlp_bias):
                raise UnsupportedConfigError("gpt_neox: qkv_bias == out_bias (attention_bias); mlp_bias is always on")
        if f == Family.QWEN2 and (not self.qkv_bias or self.out_bias or self.mlp_bias):
            raise UnsupportedConfigError("qwen2 has q/k/v biases only (qkv_bias=True, out_bias=mlp_bias=False)")
        attention_bias = (Family.LLAMA, Family.GEMMA, Family.QWEN3, Family.GEMMA2, Family.GEMMA3, Family.OLMO2)
        if f in attention_bias and self.qkv_bias != self.out_bias:
            raise UnsupportedConfigError(f"{f.value}: attention_bias sets qkv_bias == out_bias")
        if f not in (Family.LLAMA, Family.QWEN2, Family.GPT2, Family.GPT_NEOX) and self.mlp_bias:
            raise UnsupportedConfigError(f"{f.value} has no MLP biases")
        if f in (Family.MISTRAL, Family.PHI3) and (self.qkv_bias or self.out_bias):
            raise UnsupportedConfigError(f"{f.value} has no attention biases")
        if f in (Family.OLMO2, Family.PHI3) and self.head_dim * self.num_heads != self.hidden_size:
            raise UnsupportedConfigError(f"{f.value} needs head_dim * num_heads == hidden_size (no head_dim field)")

    def _validate_gemma2_features(self):
        """Soft-capping, query_pre_attn_scalar, local/global layers and local RoPE (Gemma 2/3 only)."""
        f, gemmas = self.family, (Family.GEMMA2, Family.GEMMA3)
        for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar", "layer_types"):
            value = getattr(self, name)
            if value is not None and f not in gemmas:
                raise UnsupportedConfigError(f"{name}={value!r} is a gemma2/gemma3_text feature, not {f.value}")
        for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                raise ValueError(f"layer_types must list one of {LAYER_TYPES} per layer ({self.num_layers}), got "
                                 f"{self.layer_types}")
        if (self.rope_local_theta is not None or self.rope_linear_factor != 1.0) and f != Family.GEMMA3:
            raise UnsupportedConfigError(f"local RoPE base / linear RoPE scaling are gemma3_text features, not "
                                         f"{f.value}")
        if self.rope_linear_factor <= 0:
            raise ValueError(f"rope_linear_factor must be positive, got {self.rope_linear_factor}")

    # ----------------------------------------------------------------------------- derived

    @property
    def traits(self) -> FamilyTraits:
        return FAMILY_TRAITS[self.family]

    @property
    def learned_positions(self) -> bool:
        return self.traits.learned_positions

    def layer_is_local(self, layer: int) -> bool:
        """Whether ``layer`` is a sliding-window (local) layer; see :attr:`layer_types`."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (None: global attention)."""
        return self.sliding_window if self.layer_is_local(layer) else None

    @property
    def rotary_dim(self) -> int:
        """Number of rotated dimensions per head (HF ``int(head_dim * partial_rotary_factor)``)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def jnp_param_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Exact parameter count (embeddings and, when untied, the head included)."""
        d, h, kv, hd, i, v = (self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
                              self.intermediate_size, self.vocab_size)
        norm = d if self.traits.norm != "layer" else 2 * d
        attn = d * hd * (h + 2 * kv) + h * hd * d
        attn += hd * (h + 2 * kv) * self.qkv_bias + d * self.out_bias
        attn += {None: 0, "head": 2 * hd, "full": (h + kv) * hd}[self.traits.qk_norm]
        mlp = (3 if self.traits.gated_mlp else 2) * d * i + (i * (1 + self.traits.gated_mlp) + d) * self.mlp_bias
        block_norms = 4 if self.traits.norm_layout == "sandwich" else 2
        total = self.num_layers * (attn + mlp + block_norms * norm) + norm + v * d
        total += 0 if self.tie_word_embeddings else d * v
        total += self.max_position_embeddings * d if self.learned_positions else 0
        return total

    def flops_per_token(self, seq_len: int, *, training: bool = True) -> float:
        """Matmul FLOPs per token for a length-``seq_len`` causal sequence.

        Counts every multiply-add as 2 FLOPs: the q/k/v/o, MLP and unembedding matmuls
        (``2 * N_matmul``) plus attention scores and the weighted value sum
        (``4 * L * H * hd * ctx``), where ``ctx`` is the *average number of keys a query
        really attends to*: ``(T + 1) / 2`` for causal attention, fewer under a sliding window.
        This is the work a causal kernel must do (the common ``12 L H hd T`` convention
        counts the full, half-masked score matrix). Embedding lookups, norms, softmax and
        activations are omitted (lower order). ``training`` multiplies by 3 (backward = 2x
        forward); rematerialisation is not counted, so MFU stays comparable across settings.

        Args:
          seq_len: T, tokens per sequence.
          training: count forward + backward (True) or forward only.
        """
        d, h, kv, hd, i, v = (self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
                              self.intermediate_size, self.vocab_size)
        per_layer = d * hd * (h + 2 * kv) + h * hd * d + (3 if self.traits.gated_mlp else 2) * d * i
        matmul = 2 * (self.num_layers * per_layer + d * v)
        t = np.arange(1, seq_len + 1)
        ctx = sum(float(np.minimum(t, self.layer_window(i) or seq_len).mean()) for i in range(self.num_layers))
        attention = 4 * h * hd * ctx  # ctx summed over layers (local layers see at most the window)
        return (matmul + attention) * (3 if training else 1)

    # ----------------------------------------------------------------------------- HF I/O

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any] | Any, **overrides) -> ModelConfig:
        """Builds a config from a HF ``config.json`` dict or a ``PretrainedConfig``.

        Args:
          hf: the HF config (v4 or v5 spellings).
          **overrides: fields to set afterwards, e.g. ``dtype="bfloat16"``, ``remat=True``.

        Raises:
          UnsupportedConfigError: for model types or features jaxpref does not implement.
        """
        d = dict(hf if isinstance(hf, Mapping) else hf.to_dict())
        model_type = d.get("model_type")
        try:
            family = Family(model_type)
        except ValueError:
            raise UnsupportedConfigError(f"model_type {model_type!r} is not supported; supported: "
                                         f"{[f.value for f in Family]}") from None
        for key in _MOE_KEYS:
            if d.get(key):
                raise UnsupportedConfigError(f"{family.value}: {key}={d[key]!r}: mixture-of-experts models are not "
                                             f"supported (dense families: {[f.value for f in Family]})")
        fields = _FROM_HF[family](d)
        if family == Family.GEMMA3:
            d, local_theta, linear = _gemma3_rope(d)
            fields.update(rope_local_theta=local_theta, rope_linear_factor=linear)
        theta, scaling, partial = _parse_rope(d, family)
        fields.update(rope_theta=theta, rope_scaling=scaling, partial_rotary_factor=partial)
        dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
        fields.update(
            family=family,
            param_dtype=str(dtype).removeprefix("torch."),
            initializer_range=d.get("initializer_range", 0.02),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )
        fields["dtype"] = fields["param_dtype"]
        fields.update(overrides)
        return cls(**fields)

    def to_hf_config(self) -> dict[str, Any]:
        """The HF v5 ``config.json`` dict (``architectures``, ``model_type``, ``rope_parameters``, ``dtype``)."""
        f = self.family
        act = _EXPORT_ACT.get(f, {}).get(self.act, self.act)
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope.update(rope_type="llama3", **dataclasses.asdict(self.rope_scaling))
        common = dict(vocab_size=self.vocab_size, max_position_embeddings=self.max_position_embeddings,
                      initializer_range=self.initializer_range, tie_word_embeddings=self.tie_word_embeddings)
        if f == Family.GPT2:
            out = dict(vocab_size=self.vocab_size, n_embd=self.hidden_size, n_layer=self.num_layers,
                       n_head=self.num_heads, n_inner=self.intermediate_size, n_positions=self.max_position_embeddings,
                       activation_function=act, layer_norm_epsilon=self.norm_eps,
                       initializer_range=self.initializer_range, tie_word_embeddings=self.tie_word_embeddings)
        else:
            out = dict(common, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                       num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                       hidden_act=act, rope_parameters=rope)
            if f == Family.GPT_NEOX:
                rope["partial_rotary_factor"] = self.partial_rotary_factor
                out.update(layer_norm_eps=self.norm_eps, use_parallel_residual=self.parallel_residual,
                           attention_bias=self.qkv_bias)
            else:
                out.update(num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim, rms_norm_eps=self.norm_eps)
            if f in (Family.LLAMA, Family.GEMMA, Family.QWEN3, Family.GEMMA2, Family.GEMMA3, Family.OLMO2):
                out["attention_bias"] = self.qkv_bias
            if f == Family.LLAMA:
                out["mlp_bias"] = self.mlp_bias
            if f in (Family.MISTRAL, Family.PHI3):
                out["sliding_window"] = self.sliding_window
            if f in (Family.QWEN2, Family.QWEN3):
                out.update(use_sliding_window=False, sliding_window=None)
            if f == Family.PHI3:
                rope["partial_rotary_factor"] = self.partial_rotary_factor
                out.update(original_max_position_embeddings=self.max_position_embeddings)
            if f in (Family.GEMMA2, Family.GEMMA3):
                out.pop("hidden_act")
                out.update(hidden_activation=act, query_pre_attn_scalar=self.query_pre_attn_scalar,
                           attn_logit_softcapping=self.attn_logit_softcap,
                           final_logit_softcapping=self.final_logit_softcap,
                           sliding_window=self.sliding_window,
                           layer_types=[("sliding_attention" if self.layer_is_local(i) else "full_attention")
                                        for i in range(self.num_layers)])
            if f == Family.GEMMA3:
                full = dict(rope)
                if self.rope_linear_factor != 1.0:
                    full.update(rope_type="linear", factor=self.rope_linear_factor)
                local = {"rope_type": "default", "rope_theta": self.rope_local_theta or self.rope_theta}
                out["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        out.update(architectures=[self.traits.architecture], model_type=f.value, dtype=self.param_dtype,
                   bos_token_id=self.bos_token_id, eos_token_id=eos, pad_token_id=self.pad_token_id)
        return out


def _canonical_act(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise UnsupportedConfigError(f"activation {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")


def _gemma3_rope(d: Mapping[str, Any]) -> tuple[dict[str, Any], float | None, float]:
    """Gemma 3's per-layer-type RoPE -> (config with the global layers' rope, local theta, linear factor).

    v5 writes ``rope_parameters: {"full_attention": {...}, "sliding_attention": {...}}``; v4 writes
    ``rope_theta`` (global), ``rope_local_base_freq`` and an optional ``rope_scaling`` (global).
    """
    d = dict(d)
    rope = d.get("rope_parameters") or {}
    if "full_attention" in rope or "sliding_attention" in rope:
        full, local = dict(rope.get("full_attention") or {}), dict(rope.get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise UnsupportedConfigError(f"gemma3_text: rope_parameters.sliding_attention.rope_type="
                                         f"{local['rope_type']!r} is not supported (supported: 'default')")
        local_theta = float(local.get("rope_theta", 10000.0))
        full.setdefault("rope_theta", 1000000.0)
    else:
        full = dict(d.get("rope_scaling") or {})
        full.setdefault("rope_theta", d.get("rope_theta", 1000000.0))
        local_theta = float(d.get("rope_local_base_freq", 10000.0))
    linear = 1.0
    if full.get("rope_type", full.get("type")) == "linear":
        linear = float(full["factor"])
        full = {"rope_type": "default", "rope_theta": full["rope_theta"]}
    d.pop("rope_scaling", None)
    d["rope_parameters"] = full
    return d, local_theta, linear


def _parse_rope(d: Mapping[str, Any], family: Family) -> tuple[float, RopeScaling | None, float]:
    """(theta, llama3 scaling, partial rotary factor) from v5 ``rope_parameters`` or v4 keys."""
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope and all(isinstance(v, Mapping) for v in rope.values()):
        raise UnsupportedConfigError(f"per-layer-type rope_parameters {sorted(rope)} are not supported")
    default_partial = 0.25 if family == Family.GPT_NEOX else 1.0
    theta = rope.get("rope_theta", d.get("rope_theta", d.get("rotary_emb_base", 10000.0)))
    partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", d.get("rotary_pct", default_partial)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return float(theta), None, float(partial)
    if kind == "llama3":
        scaling = RopeScaling(
            factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope.get("original_max_position_embeddings",
                                                          d.get("max_position_embeddings"))))
        return float(theta), scaling, float(partial)
    raise UnsupportedConfigError(f"{family.value}: rope_type {kind!r} (rope_parameters / rope_scaling) is not "
                                 "supported (supported: 'default', 'llama3')")


def _reject(d: Mapping[str, Any], family: Family, **unsupported_if):
    """Raises for every key whose value is truthy and differs from the supported default."""
    for key, ok in unsupported_if.items():
        if key in d and d[key] not in ok:
            raise UnsupportedConfigError(f"{family.value}: {key}={d[key]!r} is not supported (supported: {ok})")


def _llama_like(d: Mapping[str, Any]) -> dict[str, Any]:
    heads = d["num_attention_heads"]
    return dict(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"], num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        norm_eps=d.get("rms_norm_eps", 1e-6),
        act=_canonical_act(d.get("hidden_act") or d.get("hidden_activation") or "silu"),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        tie_word_embeddings=d.get("tie_word_embeddings", False),
    )


def _from_llama(d):
    _reject(d, Family.LLAMA, pretraining_tp=(1, None))
    bias = bool(d.get("attention_bias", False))
    return dict(_llama_like(d), qkv_bias=bias, out_bias=bias, mlp_bias=bool(d.get("mlp_bias", False)))


def _from_mistral(d):
    return dict(_llama_like(d), sliding_window=d.get("sliding_window"))


def _from_qwen2(d):
    _reject(d, Family.QWEN2, use_sliding_window=(False, None))
    return dict(_llama_like(d), qkv_bias=True)


def _from_gemma(d):
    _reject(d, Family.GEMMA, use_bidirectional_attention=(False, None))
    bias = bool(d.get("attention_bias", False))
    out = dict(_llama_like(d), qkv_bias=bias, out_bias=bias)
    out["tie_word_embeddings"] = d.get("tie_word_embeddings", True)
    out["act"] = _canonical_act(d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh")
    return out


def _from_gpt2(d):
    _reject(d, Family.GPT2, scale_attn_weights=(True,), scale_attn_by_inverse_layer_idx=(False,),
            reorder_and_upcast_attn=(False,), add_cross_attention=(False,))
    n_embd, n_head = d.get("n_embd", 768), d.get("n_head", 12)
    return dict(
        vocab_size=d["vocab_size"], hidden_size=n_embd, intermediate_size=d.get("n_inner") or 4 * n_embd,
        num_layers=d.get("n_layer", 12), num_heads=n_head, num_kv_heads=n_head, head_dim=n_embd // n_head,
        norm_eps=d.get("layer_norm_epsilon", 1e-5), act=_canonical_act(d.get("activation_function", "gelu_new")),
        max_position_embeddings=d.get("n_positions", 1024), tie_word_embeddings=d.get("tie_word_embeddings", True),
        qkv_bias=True, out_bias=True, mlp_bias=True)


def _from_gpt_neox(d):
    heads = d["num_attention_heads"]
    bias = bool(d.get("attention_bias", True))
    return dict(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"], num_heads=heads, num_kv_heads=heads, head_dim=d["hidden_size"] // heads,
        norm_eps=d.get("layer_norm_eps", 1e-5), act=_canonical_act(d.get("hidden_act", "gelu")),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        parallel_residual=d.get("use_parallel_residual", True), qkv_bias=bias, out_bias=bias, mlp_bias=True)


def _from_qwen3(d):
    _reject(d, Family.QWEN3, use_sliding_window=(False, None))
    bias = bool(d.get("attention_bias", False))
    return dict(_llama_like(d), qkv_bias=bias, out_bias=bias)


def _from_gemma2(d, family=Family.GEMMA2, pattern=2):
    """Gemma 2 / Gemma 3 text: Gemma plus soft-caps, query_pre_attn_scalar and local/global layers."""
    _reject(d, family, use_bidirectional_attention=(False, None))
    out = _from_gemma(d)
    n = out["num_layers"]
    pattern = d.get("sliding_window_pattern") or pattern
    types = d.get("layer_types") or [("sliding_attention" if (i + 1) % pattern else "full_attention")
                                     for i in range(n)]
    out.update(query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
               attn_logit_softcap=d.get("attn_logit_softcapping"),
               final_logit_softcap=d.get("final_logit_softcapping"),
               sliding_window=d.get("sliding_window"), layer_types=tuple(types))
    return out


def _from_gemma3(d):
    return _from_gemma2(d, Family.GEMMA3, pattern=6)


def _from_olmo2(d):
    bias = bool(d.get("attention_bias", False))
    return dict(_llama_like(d), qkv_bias=bias, out_bias=bias)


def _from_phi3(d):
    out = _llama_like(d)
    out["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
    out["sliding_window"] = d.get("sliding_window")
    return out


_FROM_HF = {Family.LLAMA: _from_llama, Family.MISTRAL: _from_mistral, Family.QWEN2: _from_qwen2,
            Family.GEMMA: _from_gemma, Family.GPT2: _from_gpt2, Family.GPT_NEOX: _from_gpt_neox,
            Family.QWEN3: _from_qwen3, Family.GEMMA2: _from_gemma2, Family.GEMMA3: _from_gemma3,
            Family.OLMO2: _from_olmo2, Family.PHI3: _from_phi3}


def rope_inv_freq(config: ModelConfig, *, local: bool = False) -> np.ndarray:
    """RoPE inverse frequencies ``[rotary_dim // 2]`` float32, as HF computes them (incl. llama3 scaling).

    ``local``: the frequencies of the sliding-window layers (Gemma 3: base ``rope_local_theta``,
    no scaling); otherwise those of the global layers (Gemma 3: divided by ``rope_linear_factor``).
    """
    dim = config.rotary_dim
    local = local and config.rope_local_theta is not None
    theta = config.rope_local_theta if local else config.rope_theta
    # float32 like transformers, so angles agree to the last bit at long positions.
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)
    if local:
        return inv_freq
    if config.rope_linear_factor != 1.0:
        return (inv_freq / np.float32(config.rope_linear_factor)).astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
