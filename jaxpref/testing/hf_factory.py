"""Tiny random Hugging Face PyTorch models, for parity tests (no download).

Models are built from a jaxpref :class:`~jaxpref.models.config.ModelConfig` through its
``to_hf_config()``, so the same preset drives both sides. ``transformers``' default init
(std 0.02, unit norms, zero biases) makes logits nearly constant and hides bugs (a
missing ``1 + w``, a swapped bias), so every floating tensor is re-drawn: weights
``N(0, weight_std)``, norm scales ``1 + N(0, 0.1)`` (Gemma: ``N(0, 0.1)`` around 0), biases
``N(0, 0.1)``.

``torch`` and ``transformers`` are imported lazily: only tests marked ``torch`` call these.
"""

from __future__ import annotations

import os
import pathlib

from jaxpref.models.config import ModelConfig


def hf_config(config: ModelConfig, **overrides):
    """A ``transformers.PretrainedConfig`` for ``config`` (float32, eager attention)."""
    from transformers import AutoConfig

    d = dict(config.to_hf_config(), **overrides)
    d.pop("architectures", None)
    model_type = d.pop("model_type")
    hf = AutoConfig.for_model(model_type, **d)
    hf._attn_implementation = "eager"
    return hf


def make_hf_model(config: ModelConfig, *, seed: int = 0, weight_std: float = 0.2, **overrides):
    """A random ``AutoModelForCausalLM`` in eval mode with well-spread weights (see module docstring).

    Args:
      config: jaxpref config describing the architecture.
      seed: torch seed for the weights.
      weight_std: std of matrix / embedding entries.
      **overrides: extra HF config keys (e.g. an option jaxpref rejects, to test errors).
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(config, **overrides), attn_implementation="eager",
                                             dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "norm" in name or ".ln_" in name:
                if name.endswith("weight") and config.traits.norm != "rms_plus_one":
                    p.copy_(1.0 + 0.1 * noise)
                else:
                    p.copy_(0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(weight_std * noise)
    return model.eval()


def save_hf_model(config: ModelConfig, path: str | os.PathLike, *, seed: int = 0, **kwargs):
    """Builds :func:`make_hf_model` and ``save_pretrained``-s it (safetensors) to ``path``.

    Returns:
      (the torch model, the directory).
    """
    model = make_hf_model(config, seed=seed, **kwargs)
    path = pathlib.Path(path)
    model.save_pretrained(path)
    return model, path
