"""Tokenisation: chat template + prompt-prefix check, plain concat, truncation policies."""

from __future__ import annotations

import numpy as np
import pytest

from jaxpref import data
from jaxpref.testing.tokenizers import CHAT_TEMPLATES, make_tokenizer


def _rec(i, prompt, chosen, rejected, **kw):
    return data.PreferenceRecord(row=i, id=f"r{i}", prompt=prompt, chosen=chosen, rejected=rejected, **kw)


def test_chat_template_prefix_and_eos():
    tok = make_tokenizer()
    rec = _rec(0, "What is the capital of France?", "Paris.", "London.")
    pairs = data.tokenize_pairs([rec], tok)
    gen_prompt = tok.apply_chat_template([{"role": "user", "content": rec.prompt}], tokenize=False,
                                         add_generation_prompt=True)
    assert pairs.prompt[0].tolist() == tok(gen_prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(pairs.chosen[0]) == "Paris.<|end|></s>"
    assert pairs.stats.prefix_fixed == 0 and pairs.tie.tolist() == [False] and pairs.votes.tolist() == [1.0]


def test_prefix_mismatch_fixed_or_rejected():
    tok = make_tokenizer(template="space")  # "<|assistant|> " + "Sure": the space merges into " Sure"
    recs = [_rec(0, "hi", "Sure thing", "The dog"), _rec(1, "hello", "How are you", "Hello")]
    pairs = data.tokenize_pairs(recs, tok)
    assert len(pairs) == 2 and pairs.stats.prefix_fixed == 2
    gen_prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    # the prompt ids are those the model sees at generation time; the response is the rest
    assert pairs.prompt[0].tolist() == tok(gen_prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(np.concatenate([pairs.prompt[0], pairs.chosen[0]])) == gen_prompt + "Sure thing<|end|></s>"
    rejects = data.RejectLog()
    strict = data.tokenize_pairs(recs, tok, data.TokenizeConfig(prefix_mismatch="reject"), rejects=rejects)
    assert len(strict) == 0 and {r.reason for r in rejects} == {"prompt_prefix_mismatch"}


def test_template_error_is_a_row_reject():
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}")
    sys_prompt = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]
    recs = [_rec(0, "hi", "a", "b"), _rec(1, sys_prompt, [{"role": "assistant", "content": "a"}],
                                          [{"role": "assistant", "content": "b"}])]
    rejects = data.RejectLog()
    pairs = data.tokenize_pairs(recs, tok, rejects=rejects)
    assert len(pairs) == 1 and [(r.row, r.reason) for r in rejects] == [(1, "template_error")]


def test_messages_format_end_to_end(tmp_path):
    import json

    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "capital of France?"}]
    rows = [{"chosen": conv + [{"role": "assistant", "content": "Paris"}],
             "rejected": conv + [{"role": "assistant", "content": "Rome"}]},
            {"prompt": "q?", "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]}]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefs = data.load_preferences(path)
    assert prefs.config.format == "messages" and len(prefs.records) == 2
    assert prefs.records[0].prompt == conv and prefs.records[0].chosen == [{"role": "assistant", "content": "Paris"}]
    tok = make_tokenizer()
    pairs = data.tokenize_pairs(prefs.records, tok)
    assert tok.decode(pairs.prompt[0]) == ("<s><|user|>hi<|end|><|assistant|>hello<|end|>"
                                           "<|user|>capital of France?<|end|><|assistant|>")
    assert tok.decode(pairs.rejected[0]) == "Rome<|end|></s>"
    with pytest.raises(ValueError, match="message lists"):
        data.tokenize_pairs(prefs.records, make_tokenizer(template=None))


def test_plain_concat_and_truncation_policies():
    tok = make_tokenizer(template=None)
    prompt = " ".join(["word"] * 20)
    long_resp = " " + " ".join(["fox"] * 30)
    rec = _rec(0, prompt, long_resp, " dog")
    p_ids = tok(prompt)["input_ids"]
    c_ids = tok(long_resp, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert p_ids[0] == tok.bos_token_id and len(p_ids) > 12 and len(c_ids) > 12

    full = data.tokenize_pairs([rec], tok, data.TokenizeConfig(max_length=200))
    assert full.prompt[0].tolist() == p_ids and full.chosen[0].tolist() == c_ids

    L = 24
    keep_end = data.tokenize_pairs([rec], tok, data.TokenizeConfig(max_length=L, min_prompt_tokens=4))
    p = keep_end.prompt[0].tolist()
    assert p[0] == tok.bos_token_id and p[1:] == p_ids[-3:]  # BOS kept, then the newest tokens
    assert keep_end.chosen[0].tolist() == c_ids[:L - 4] and keep_end.lengths().max() == L
    assert keep_end.stats.prompt_truncated == 1 and keep_end.stats.response_truncated == 1

    cap = data.tokenize_pairs([rec], tok, data.TokenizeConfig(max_length=200, max_prompt_length=8))
    assert cap.prompt[0].tolist() == [tok.bos_token_id] + p_ids[-7:] and cap.chosen[0].tolist() == c_ids

    room = len(p_ids) + 8
    tr = data.tokenize_pairs([rec], tok, data.TokenizeConfig(max_length=room, truncation="truncate_response"))
    assert tr.prompt[0].tolist() == p_ids and tr.chosen[0].tolist() == c_ids[:8]
    assert tr.chosen[0][-1] != tok.eos_token_id and tr.rejected[0][-1] == tok.eos_token_id

    rejects = data.RejectLog()
    drop = data.tokenize_pairs([rec], tok, data.TokenizeConfig(max_length=room, truncation="drop"), rejects=rejects)
    assert len(drop) == 0 and [r.reason for r in rejects] == ["too_long"]
    assert drop.stats.rejected == {"too_long": 1}


def test_identical_after_truncation():
    tok = make_tokenizer(template=None)
    rec = _rec(0, "q?", " same start then A", " same start then B")
    rejects = data.RejectLog()
    out = data.tokenize_pairs([rec], tok, data.TokenizeConfig(max_length=5, truncation="truncate_response"),
                              rejects=rejects)
    assert len(out) == 0 and [r.reason for r in rejects] == ["identical_after_truncation"]


def test_config_validation():
    with pytest.raises(ValueError, match="truncation"):
        data.TokenizeConfig(truncation="left")
    with pytest.raises(ValueError, match="max_prompt_length"):
        data.TokenizeConfig(max_length=10, max_prompt_length=10)
    with pytest.raises(ValueError, match="format"):
        data.DataFormatConfig(format="csv")
    with pytest.raises(ValueError, match="unknown field mapping key"):
        data.format_config("explicit", fields={"question": "q"})
    cfg = data.format_config("explicit", fields={"prompt": "question", "chosen": "good"})
    assert (cfg.prompt_field, cfg.chosen_field, cfg.rejected_field) == ("question", "good", "rejected")
    assert set(CHAT_TEMPLATES) >= {"simple", "space"}


def test_sft_records(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "Say hi", "response": "hi"}\n{"prompt": "Say yo", "response": 3}\n'
                    '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    prefs = data.load_preferences(path)
    assert prefs.config.format == "sft" and [r.row for r in prefs.records] == [0, 2]
    assert [(r.row, r.reason) for r in prefs.rejects] == [(1, "not_text")]
    tok = make_tokenizer()
    sft = data.tokenize_sft(prefs.records, tok)
    assert tok.decode(sft.response[0]) == "hi<|end|></s>" and tok.decode(sft.response[1]) == "a<|end|></s>"
