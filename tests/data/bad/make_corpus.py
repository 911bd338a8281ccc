"""Regenerates the bad-input corpus in this directory (deterministic; run from anywhere).

    python tests/data/bad/make_corpus.py

Each file mixes good rows with bad ones; ``tests/test_data_bad_inputs.py`` states, per file,
whether it is a file-level error or which rows are rejected and why (see README.md).
"""

import gzip
import json
import pathlib

HERE = pathlib.Path(__file__).resolve().parent


def good(i, **kw):
    row = {"id": f"g{i}", "prompt": f"Question {i}?", "chosen": f" Good answer {i}.", "rejected": f" Bad answer {i}."}
    row.update(kw)
    return row


def lines(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def write(name, data: bytes):
    (HERE / name).write_bytes(data)


def main():
    write("missing_field.jsonl", lines([
        good(0),
        {"id": "m1", "prompt": "Q?", "rejected": " r"},                 # row 1: no chosen
        {"id": "m2", "chosen": " c", "rejected": " r", "other": 1},       # row 2: no prompt
        good(3),
    ]))
    write("non_text.jsonl", lines([
        good(0),
        good(1, prompt=None),                                             # row 1: null
        good(2, chosen=42),                                               # row 2: number
        good(3, rejected=["a", "list"]),                                  # row 3: list
        good(4, chosen={"text": "an object"}),                            # row 4: object
        good(5, rejected=True),                                           # row 5: boolean
        good(6),
    ]))
    write("empty_responses.jsonl", lines([
        good(0),
        good(1, chosen=""),                                               # row 1: empty
        good(2, rejected="   \n\t "),                                     # row 2: whitespace only
        good(3, prompt=" "),                                              # row 3: whitespace prompt
        good(4),
    ]))
    write("identical.jsonl", lines([good(0), good(1, rejected=" Good answer 1."), good(2)]))
    write("invalid_utf8.jsonl",
          lines([good(0)])
          + b'{"id": "u1", "prompt": "caf\xe9 \xff", "chosen": " c", "rejected": " r"}\n'  # row 1: Latin-1 bytes
          + b'{"id": "u2", "prompt": "lone \\ud800 surrogate", "chosen": " c", "rejected": " r"}\n'  # row 2
          + lines([good(3, prompt="caf\u00e9 \u4e2d\u6587 \U0001f642")]))  # row 3: valid non-ASCII
    write("control_chars.jsonl", lines([
        good(0, chosen=" tab\tand\nnewline\r\nare fine"),                 # row 0: kept
        good(1, prompt="nul \x00 byte"),                                  # row 1: NUL
        good(2, rejected=" escape \x1b[31m red"),                         # row 2: ESC
        good(3, chosen=" C1 \x85 next line"),                             # row 3: C1 control
        good(4),
    ]))
    write("truncated_last_line.jsonl",
          lines([good(0), good(1)]) + b'{"id": "t2", "prompt": "Question 2?", "chosen": " Goo')  # row 2 cut
    full = lines([good(i) for i in range(50)])
    gz = gzip.compress(full, mtime=0)
    write("cut_short.jsonl.gz", gz[: len(gz) // 2])
    write("corrupt.jsonl.gz", b"this is not gzip data at all\n" * 4)
    write("long_prompt.jsonl", lines([
        good(0),
        good(1, prompt=" ".join(["word"] * 400) + "?"),                   # row 1: ~400 tokens
        good(2),
    ]))
    write("bad_votes.jsonl", lines([
        {"id": "v0", "prompt": "Q?", "response_a": " a", "response_b": " b", "p_a_preferred": 0.75},
        {"id": "v1", "prompt": "Q?", "response_a": " a", "response_b": " b", "p_a_preferred": 1.5},
        {"id": "v2", "prompt": "Q?", "response_a": " a", "response_b": " b", "p_a_preferred": -0.25},
        {"id": "v3", "prompt": "Q?", "response_a": " a", "response_b": " b", "p_a_preferred": "0.7"},
        {"id": "v4", "prompt": "Q?", "response_a": " a", "response_b": " b", "p_a_preferred": None},
        {"id": "v5", "prompt": "Q?", "response_a": " a", "response_b": " b", "p_a_preferred": True},
        {"id": "v6", "prompt": "Q?", "response_a": " a", "response_b": " b", "p_a_preferred": 0.5},
        {"id": "v7", "prompt": "Q?", "response_a": " a", "response_b": " b", "p_a_preferred": 0.2},
        {"id": "v8", "prompt": "Q?", "response_a": " a", "response_b": " b"},
    ]) + b'{"id": "v9", "prompt": "Q?", "response_a": " a", "response_b": " b", "p_a_preferred": NaN}\n')
    write("duplicate_ids.jsonl", lines([
        good(0), good(1), good(0, prompt="Another question?"),            # row 2: id g0 again
        good(3, id="g1", chosen=""),                                      # row 3: dup id but empty -> empty_field
        good(4, id=7), good(5, id="7"),                                   # row 5: "7" == str(7)
        good(6, id=[1]),                                                  # row 6: invalid id
    ]))
    write("invalid_json.jsonl", lines([good(0)])
          + b'{"id": "j1", "prompt": "Q?", "chosen": " c",}\n'          # row 1: trailing comma
          + b"[1, 2, 3]\n"                                               # row 2: not an object
          + b"\n"                                                        # line 3: blank, not a row
          + b'"just a string"\n'                                         # row 4: not an object
          + b"{{{{\n"                                                    # row 5: invalid JSON
          + lines([good(6)]))
    write("empty.jsonl", b"")
    write("blank_lines.jsonl", b"\n   \n\n")
    write("unknown_ext.csv", b"prompt,chosen,rejected\nq,c,r\n")
    write("undetectable.jsonl", lines([{"question": "Q?", "good": " c", "bad": " r"}]))
    write("hh_no_common_prompt.jsonl", lines([
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
        {"chosen": "\n\nHuman: one", "rejected": "\n\nHuman: two"},       # row 1: no assistant tag
    ]))
    write("bad_messages.jsonl", lines([
        {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bye"}]},
        {"chosen": [{"role": "user"}], "rejected": [{"role": "user", "content": "hi"}]},   # row 1
        {"chosen": "not a list", "rejected": [{"role": "user", "content": "hi"}]},         # row 2
        {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
         "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]},  # row 3
    ]))
    d = HERE / "directory.jsonl"
    d.mkdir(exist_ok=True)
    (d / ".gitkeep").write_bytes(b"")


if __name__ == "__main__":
    main()
