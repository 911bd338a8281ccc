"""LoRA runs out to Hugging Face and PEFT, and PEFT adapters into jaxpref (torch, transformers, peft 0.21).

A 2-step LoRA DPO run on a random Hugging Face Llama (``hf:`` base, ``reference.strategy=precomputed``: the
reference log-prob cache of the base with the adapters off) is exported with ``train.export_hf --merge``
(transformers loads it; logits within 1e-4 of jaxpref's LoRA model, float32) and ``--adapter`` (``peft`` loads
it onto the transformers base; logits within 1e-4). An adapter made by ``peft`` itself loads into jaxpref
(``model.adapter``), unrolled or stacked, with peft's logits. Bad adapters are one-line errors.
"""

import json
import logging

import numpy as np
import pytest

from jaxpref import loading
from jaxpref.config import ConfigError, RunConfig, load_config
from jaxpref.models import presets
from jaxpref.testing.tolerances import dpo_ln2_tol
from jaxpref.training.loop import run_training
from train import export_hf

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

TINY = presets.tiny_llama(vocab_size=512)
IDS = (np.arange(24).reshape(2, 12) * 37 + 5) % 512
COMMON = ["model.tokenizer=builtin", "data.limit=8", "data.max_length=32", "data.buckets=[32]",
          "train.batch_size=8", "logging.progress=false", "logging.tensorboard=false", "train.seq_chunk=32",
          "train.vocab_chunk=256", "optim.lr=2e-2", "lora={rank: 4, alpha: 8}", "train.steps=2",
          "checkpoint.async_save=false", "reference.strategy=precomputed"]


def jax_logits(model):
    return np.asarray(model(IDS, segment_ids=np.ones_like(IDS), return_logits=True).logits)


def torch_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS, dtype=torch.long)).logits.numpy()


def hf_base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, shared_data):
    from jaxpref.testing.hf_factory import save_hf_model

    tmp = tmp_path_factory.mktemp("lora_export")
    save_hf_model(TINY, tmp / "base", weight_std=0.1)
    hh = shared_data / "hh_rlhf_helpful_base_test_2k.jsonl"
    summary = run_training(load_config(RunConfig, None, [
        f"run_dir={tmp / 'run'}", f"data.train={hh}", f"model.source=hf:{tmp / 'base'}",
        f"reference.cache_dir={tmp / 'cache'}", *COMMON]))
    export_hf.main(["--run", str(tmp / "run"), "--out", str(tmp / "merged"), "--merge"])
    export_hf.main(["--run", str(tmp / "run"), "--out", str(tmp / "adapter"), "--adapter"])
    policy = jax_logits(loading.load_model(f"run:{tmp / 'run'}").model)
    return tmp, summary, policy


def test_precomputed_reference_run_starts_at_ln2_and_trains(exported):
    tmp, summary, _ = exported
    rows = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]
    tol = dpo_ln2_tol(TINY, 32, first["logps/chosen"], first["logps/rejected"], beta=0.1, n_pairs=8)
    assert first["loss"] == pytest.approx(np.log(2), abs=tol)
    assert rows[-1]["loss"] < first["loss"]
    assert summary["reference_logps"]["computed"] and any((tmp / "cache").rglob("*"))


def test_merged_export_loads_in_transformers_with_matching_logits(exported):
    tmp, _, policy = exported
    base = torch_logits(hf_base(tmp / "base"))
    assert np.abs(policy - base).max() > 1e-2  # the adapters trained: the comparison below is not the base's
    np.testing.assert_allclose(torch_logits(hf_base(tmp / "merged")), policy, atol=1e-4, rtol=1e-4)
    assert json.loads((tmp / "merged" / "jaxpref_export.json").read_text())["merged"] is True


def test_adapter_export_loads_in_peft_with_matching_logits(exported):
    from peft import PeftModel

    tmp, _, policy = exported
    cfg = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["base_model_name_or_path"]) == (4, 8.0, str((tmp / "base").resolve()))
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    model = PeftModel.from_pretrained(hf_base(tmp / "base"), tmp / "adapter").eval()
    np.testing.assert_allclose(torch_logits(model), policy, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def peft_adapter(exported):
    """An adapter made by peft (random A and B) on q, o and down of the base, and its logits under peft."""
    from peft import LoraConfig, get_peft_model

    tmp = exported[0]
    torch.manual_seed(0)
    model = get_peft_model(hf_base(tmp / "base"), LoraConfig(r=3, lora_alpha=6, init_lora_weights=False,
                                                             target_modules=["q_proj", "o_proj", "down_proj"]))
    model.peft_config["default"].base_model_name_or_path = str(tmp / "base")
    model.save_pretrained(tmp / "peft_made")
    return tmp, torch_logits(model.eval())


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "stacked"])
def test_peft_made_adapter_loads_into_jaxpref(peft_adapter, scan):
    tmp, want = peft_adapter
    cfg = load_config(RunConfig, None, [f"model.source=hf:{tmp / 'base'}", f"model.adapter={tmp / 'peft_made'}"])
    loaded = loading.load_model(cfg.model.source, adapter=cfg.model.adapter, overrides={"scan_layers": scan})
    got = jax_logits(loaded.model)
    assert np.abs(got - torch_logits(hf_base(tmp / "base"))).max() > 1e-2
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_bad_adapters_are_one_line_errors(peft_adapter, tmp_path, caplog):
    from peft import LoraConfig, get_peft_model

    from jaxpref.testing.hf_factory import make_hf_model

    tmp, _ = peft_adapter
    base = f"hf:{tmp / 'base'}"
    other = get_peft_model(make_hf_model(presets.tiny_llama(vocab_size=512, intermediate_size=48)),
                           LoraConfig(r=2, target_modules=["down_proj"]))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match=r"model.adapter=.*lora_A of layers.0.mlp.down_fd has shape \(2, 48\), "
                                          r"this model needs \(2, 64\) \(an adapter for another base model\?\)"):
        loading.load_model(base, adapter=str(tmp_path / "other"))
    with pytest.raises(ConfigError, match=r"model.adapter=.*expected a PEFT adapter directory"):
        loading.load_model(base, adapter=str(tmp_path))
    cfg = json.loads((tmp / "peft_made" / "adapter_config.json").read_text())
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "adapter_model.safetensors").write_bytes(
        (tmp / "peft_made" / "adapter_model.safetensors").read_bytes())
    (tmp_path / "moved" / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "x/other"}))
    with caplog.at_level(logging.WARNING):
        loading.load_model(base, adapter=str(tmp_path / "moved"))
    assert any("base_model_name_or_path=x/other differs" in r.getMessage() for r in caplog.records)
    full = tmp_path / "full"  # a run without LoRA: its model.json has no lora record
    full.mkdir()
    (full / "model.json").write_text(json.dumps({"hf_config": TINY.to_hf_config(), "source": "preset:tiny_llama"}))
    with pytest.raises(SystemExit, match="--adapter: run .* was trained without a lora section"):
        export_hf.main(["--run", str(full), "--out", str(tmp_path / "x"), "--adapter"])
