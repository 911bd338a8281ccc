"""Model FLOPs of a preference step, and model FLOPs utilisation (MFU).

A preference step on ``B`` pairs of length ``T`` runs ``2B`` sequences (chosen and rejected)
through the policy, forward and backward (3x the forward FLOPs), and, with a live reference,
the same ``2B`` sequences through the reference, forward only (1x). A precomputed reference
costs nothing inside the step (its forward was paid once, offline); reference-free losses
have none. Per-token FLOPs come from :meth:`jaxpref.models.ModelConfig.flops_per_token`
(matmuls plus causal attention, rematerialisation not counted), so MFU stays comparable
across ``remat`` settings and chunk sizes:

    flops = step_flops(config, batch_pairs=8, seq_len=1024, reference="live")
    print(f"MFU {mfu(flops, seconds_per_step, peak_flops=989e12):.1%}")

The counts are for padded tokens (the work the step really does on ``[B, 2, T]`` arrays);
scale by the useful-token fraction to get the useful-work MFU.
"""

from __future__ import annotations

from jaxpref.models.config import ModelConfig

REFERENCES = ("live", "precomputed", "none")


def step_flops(config: ModelConfig, batch_pairs: int, seq_len: int, reference: str = "live") -> float:
    """Model FLOPs of one preference step (padded tokens).

    Args:
      config: the policy's (and reference's) architecture.
      batch_pairs: B, preference pairs per step (2B sequences).
      seq_len: T, padded length of every sequence.
      reference: ``live`` (reference forward inside the step), ``precomputed`` or ``none``.

    Returns:
      ``2B * T * (3 * fwd + ref * fwd)`` with ``fwd = config.flops_per_token(T, training=False)``
      and ``ref`` 1 for a live reference, else 0.
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    if batch_pairs < 0 or seq_len < 1:
        raise ValueError(f"need batch_pairs >= 0 and seq_len >= 1, got {batch_pairs}, {seq_len}")
    tokens = 2 * batch_pairs * seq_len
    policy = config.flops_per_token(seq_len, training=True)
    ref = config.flops_per_token(seq_len, training=False) if reference == "live" else 0.0
    return float(tokens * (policy + ref))


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved ``flops / seconds`` as a fraction of ``peak_flops`` (per second)."""
    if seconds <= 0 or peak_flops <= 0:
        raise ValueError(f"need seconds > 0 and peak_flops > 0, got {seconds}, {peak_flops}")
    return flops / seconds / peak_flops
