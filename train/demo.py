"""The embedded-default demo (README command 1).

Placeholder until the exact-oracle testbed demo lands: runs the chunked log-prob path on a
random tiny input and prints the per-sequence log-probs, proving the install works.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def main() -> None:
    from jaxpref.logprobs import sequence_logprobs

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k1, (2, 16, 32))
    w = jax.random.normal(k2, (32, 100)) / 32**0.5
    ids = jax.random.randint(k3, (2, 16), 0, 100)
    mask = (jnp.arange(16) >= 6).astype(jnp.int32)[None].repeat(2, 0)
    out = sequence_logprobs(hidden, w, ids, mask, seq_chunk=4, vocab_chunk=32)
    print("summed response log-probs:", out.sums, "tokens:", out.counts)


if __name__ == "__main__":
    main()
