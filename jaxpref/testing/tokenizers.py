"""Tiny tokenizers built locally (no network), wrapped as ``transformers`` fast tokenizers.

``make_tokenizer()`` trains a byte-level BPE on a few dozen strings in a few milliseconds. It
encodes any Unicode text (byte fallback through the ByteLevel alphabet), has ``<s>`` (BOS,
added by the post-processor), ``</s>`` (EOS), ``<pad>`` and turn-marker special tokens, and a
simple chat template::

    <s><|user|>hi<|end|><|assistant|>hello<|end|></s>?   (EOS is the pipeline's to add)

so prompts rendered with ``add_generation_prompt=True`` end in ``<|assistant|>`` and are a token
prefix of the full conversation. ``template="space"`` puts a space after each role marker, so the
generation prompt ends in ``" "``, which merges with the first word of the response (``" Sure"``
is one pre-token): the prompt's tokens are then *not* a prefix of the full conversation's, the
real-world case the prompt-prefix check in :mod:`jaxpref.data.tokenize` exists for.

``add_gguf_bpe_tokenizer(writer)`` writes a minimal byte-level BPE vocabulary as llama.cpp
tokenizer metadata into a ``gguf.GGUFWriter``, for tiny GGUF test files.
"""

from __future__ import annotations

import functools

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

CHAT_TEMPLATES = {
    "simple": ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|>{% endif %}"),
    "space": ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}<|end|>{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|> {% endif %}"),
}

_CORPUS = (
    "\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "\n\nHuman: Can you help me with my homework?\n\nAssistant: Sure, what do you need help with?",
    "\n\nHuman: hi\n\nAssistant: Hello! How can I help you today?",
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
    "I don't know anything about that, sorry. I think you should ask someone else.",
    "The quick brown fox jumps over the lazy dog. 1234567890 !?.,;:'\"()[]{}",
    "def f(x):\n    return x + 1\n\n\n",
)


@functools.cache
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(_CORPUS) * 4, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return tok.to_str()


def make_tokenizer(vocab_size: int = 512, template: str | None = "simple"):
    """A small byte-level BPE ``PreTrainedTokenizerFast`` (offline, deterministic).

    Args:
      vocab_size: target vocabulary size (the tiny corpus may yield fewer merges).
      template: a key of :data:`CHAT_TEMPLATES` or None for no chat template.

    Returns:
      A fresh ``transformers.PreTrainedTokenizerFast`` with bos ``<s>``, eos ``</s>`` and pad
      ``<pad>`` (id 0); ``tokenizer(text)`` prepends BOS.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
                                  bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[3:])})
    if template is not None:
        tok.chat_template = CHAT_TEMPLATES[template]
    return tok


GGUF_BPE_VOCAB = 260  # tokens written by add_gguf_bpe_tokenizer


def add_gguf_bpe_tokenizer(writer) -> None:
    """Minimal llama.cpp tokenizer metadata on a ``gguf.GGUFWriter`` (for tiny GGUF test files).

    A byte-level BPE vocabulary of :data:`GGUF_BPE_VOCAB` tokens: 3 control tokens
    (``<|endoftext|>``, ``<|im_start|>`` = BOS 1, ``<|im_end|>`` = EOS and PAD 2), the 256 byte
    symbols, and one merge (``"Ġ t"`` -> the last token); plus a one-line chat template.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + symbols + ["Ġt"]
    assert len(tokens) == GGUF_BPE_VOCAB
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
