"""Export a run's policy as a Hugging Face checkpoint directory (safetensors + config + tokenizer).

    python -m train.export_hf --run runs/hh_dpo[@STEP] --out exports/hh_dpo [--dtype bfloat16]
    python -m train.export_hf --run runs/hh_lora --out exports/hh_lora --merge      # LoRA: merged weights
    python -m train.export_hf --run runs/hh_lora --out exports/hh_lora_peft --adapter  # LoRA: PEFT adapter

The result loads with ``transformers.AutoModelForCausalLM.from_pretrained(out)`` and
``AutoTokenizer.from_pretrained(out)``, and as ``hf:OUT`` in jaxpref. A run whose tokenizer is
``hf:DIR`` gets that directory's tokenizer files copied; any other tokenizer is saved with
``save_pretrained``. A LoRA run (``lora:`` section) exports merged full weights (``--merge``, the default
for it) or, with ``--adapter``, a PEFT adapter directory that ``peft.PeftModel.from_pretrained`` loads onto
the Hugging Face base.
"""

from __future__ import annotations

import argparse
import json
import logging

from jaxpref.cli import expected_errors, fail


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Export a jaxpref run checkpoint as a Hugging Face directory.")
    p.add_argument("--run", required=True, help="run directory, optionally @STEP (default: latest checkpoint)")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="export dtype (default: the run's param_dtype)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--merge", action="store_true", help="LoRA runs: fold the adapters into the weights (default)")
    how.add_argument("--adapter", action="store_true", help="LoRA runs: write a PEFT adapter directory instead")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from jaxpref.loading import export_hf

    try:
        info = export_hf(args.run, args.out, dtype=args.dtype, adapter=args.adapter)
    except (*expected_errors(), OSError) as err:
        fail(err)
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
