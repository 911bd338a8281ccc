"""``train.export_hf``: a 2-step tiny run exported as a Hugging Face directory reloads with
``jaxpref.models.load_hf`` to exactly the checkpoint's parameters, carries a working tokenizer,
and loads in ``transformers`` with matching logits (torch)."""

import filecmp
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxpref import loading, models
from jaxpref.testing.tokenizers import make_tokenizer
from train import export_hf

REPO = pathlib.Path(__file__).resolve().parents[1]
# The COMMON pattern of tests/test_train_e2e.py, shrunk; equal to tests/test_sweep.py's TINY so both
# share compiled programs through the session's compilation cache (the ``subprocess_env`` fixture).
TINY = ["model.source=preset:tiny_llama", "model.tokenizer=builtin", "model.overrides={vocab_size: 512}",
        "data.limit=8", "data.max_length=64", "data.buckets=[64]", "train.batch_size=8", "optim.lr=1e-3",
        "logging.progress=false", "logging.tensorboard=false", "train.seq_chunk=32", "train.vocab_chunk=256",
        "loss=[{name: sigmoid}]"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, shared_data, subprocess_env):
    """A 2-step DPO run (checkpoints at steps 1 and 2), exported from its latest step to ``hf/``."""
    tmp = tmp_path_factory.mktemp("export")
    hh = shared_data / "hh_rlhf_helpful_base_test_2k.jsonl"
    proc = subprocess.run([sys.executable, "-m", "train.preference", f"run_dir={tmp / 'run'}", f"data.train={hh}",
                           *TINY, "train.steps=2", "checkpoint.every=1"],
                          cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    export_hf.main(["--run", str(tmp / "run"), "--out", str(tmp / "hf")])
    return tmp


def flat_params(model) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.Param)
    return {".".join(map(str, p)): np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(state)}


def test_export_reloads_to_the_checkpoint_params(exported):
    out = exported / "hf"
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "jaxpref_export.json"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "jaxpref_export.json").read_text())["source"].endswith("@2")
    got = flat_params(models.load_hf(out))
    want = flat_params(loading.load_model(f"run:{exported / 'run'}").model)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_export_of_an_earlier_step(exported, capsys):
    export_hf.main(["--run", f"{exported / 'run'}@1", "--out", str(exported / "hf1")])
    assert json.loads(capsys.readouterr().out)["model"].endswith("@1")
    step1 = flat_params(models.load_hf(exported / "hf1"))
    want = flat_params(loading.load_model(f"run:{exported / 'run'}@1").model)
    for k in want:
        np.testing.assert_array_equal(step1[k], want[k], err_msg=k)
    final = flat_params(models.load_hf(exported / "hf"))
    assert any(not np.array_equal(step1[k], final[k]) for k in final)  # it trained between steps 1 and 2


def test_exported_tokenizer_matches_the_run_tokenizer(exported, tmp_path):
    from transformers import AutoTokenizer

    out = exported / "hf"
    tok, want = AutoTokenizer.from_pretrained(out), make_tokenizer(512)
    text = "\n\nHuman: What is the capital of France?\n\nAssistant: Paris."
    assert tok(text).input_ids == want(text).input_ids
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        want.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # An hf:DIR tokenizer is copied verbatim rather than re-saved.
    assert loading.export_tokenizer(f"hf:{out}", tmp_path).startswith("copied from")
    assert filecmp.cmp(out / "tokenizer.json", tmp_path / "tokenizer.json", shallow=False)


def test_export_errors_are_clear(exported, tmp_path):
    with pytest.raises(SystemExit, match="no committed checkpoint 7"):
        export_hf.main(["--run", f"{exported / 'run'}@7", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="no model.json"):
        export_hf.main(["--run", str(tmp_path), "--out", str(tmp_path / "y")])


@pytest.mark.torch
def test_transformers_loads_the_export_with_matching_logits(exported):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    out = exported / "hf"
    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.array([[1, 5, 9, 42, 7, 100, 3, 11]], np.int32)
    with torch.no_grad():
        want = hf_model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    model = models.load_hf(out)
    got = np.asarray(model(ids, segment_ids=np.ones_like(ids), return_logits=True).logits)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
