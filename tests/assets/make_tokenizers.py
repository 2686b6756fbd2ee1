"""Build the tiny offline tokenizers in tests/assets/tokenizers/{qwen2,llama3,gemma3}/.

We cannot download from the hub in tests, so each tokenizer is trained here with the `tokenizers`
library on a small built-in corpus, shaped like the real one (pre-tokenizer, special tokens, bos
handling, chat template), and saved with `PreTrainedTokenizerFast.save_pretrained` so that
`AutoTokenizer.from_pretrained(dir)` loads it offline. Deterministic: run it again and the files
come out identical.

    python tests/assets/make_tokenizers.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

OUT = Path(__file__).parent / "tokenizers"

QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The Qwen2.5 ChatML template without the tools branch (default system prompt kept).
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama 3.1-style template without the tools / date block.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# The Gemma 3 template (text parts only).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}"
)


def corpus() -> list[str]:
    """A few KB of varied text: prose, dialogue, digits, punctuation, code, some Chinese."""
    subjects = ["The cat", "A teacher", "My neighbour", "The river", "Our team", "This model", "The computer",
                "A small bird", "The old library", "Every student"]
    verbs = ["reads", "finds", "builds", "answers", "explains", "writes", "moves", "learns", "shows", "counts"]
    objects = ["the answer quickly.", "a short story about the sea.", "three new questions!", "the capital of France?",
               "why the sky is blue.", "a list of prime numbers.", "the function in Python.", "it again, slowly.",
               "what you asked for.", "the data in the table."]
    lines = []
    for i, s in enumerate(subjects):
        for j, v in enumerate(verbs):
            lines.append(f"{s} {v} {objects[(i * 3 + j) % len(objects)]}")
    lines += [
        "What is 12 + 30? The answer is 42.", "In 1969, 3 astronauts flew to the Moon; 2 walked on it.",
        "Water boils at 100 degrees Celsius (212 F).", "Paris is the capital of France. Tokyo is in Japan.",
        "Please summarise the following text in one sentence.", "Translate to French: good morning -> bonjour.",
        "You are a helpful assistant. Answer briefly and politely.", "Hello! How are you today? I'm fine, thanks.",
        "def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i * i)\n",
        "if (x > 0) { y = x / 2; } else { y = -x; }", "import numpy as np\narr = np.zeros((3, 4))\n",
        '{"name": "qlocal", "version": "0.1.0", "items": [1, 2, 3]}', "https://example.com/path?q=1&r=2",
        "Email: someone@example.org -- phone: +1 (555) 010-9999.", "It's, we're, they've, I'll, she'd, don't.",
        "你好，世界。我们今天学习中文。", "机器学习是人工智能的一个分支。", "北京是中国的首都。",
        "Instruction: Give three tips for staying healthy.\nResponse: Eat well, sleep, and exercise.",
        "### Instruction:\nName a colour.\n\n### Response:\nBlue.",
        "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159 -7 1e-5 50%",
        "Punctuation: . , ; : ! ? ' \" ( ) [ ] { } < > / \\ | - _ = + * & ^ % $ # @ ~ `",
        "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!",
        "Question: Who wrote Hamlet?\nAnswer: William Shakespeare.",
        "   indented line with    several   spaces\tand\ttabs\n\n\nand blank lines.",
    ]
    return lines * 3


def _save(tok: Tokenizer, name: str, **kwargs: object) -> None:
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    out = OUT / name
    shutil.rmtree(out, ignore_errors=True)
    fast.save_pretrained(str(out))
    # save_pretrained may write the template into a separate file; keep the folder minimal and
    # stable across runs by dropping anything not needed to load it.
    print(f"{name}: vocab {tok.get_vocab_size()} -> {out}")


def byte_level(pattern: str, specials: list[str], vocab_size: int) -> Tokenizer:
    """GPT-4-style byte-level BPE (Qwen2 / Llama 3 shape)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def make_qwen2() -> None:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = byte_level(QWEN_PATTERN, specials, 600)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    _save(tok, "qwen2", eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
          unk_token=None, chat_template=QWEN_TEMPLATE, model_max_length=32768,
          additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def make_llama3() -> None:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = byte_level(LLAMA3_PATTERN, specials, 600)
    bos = "<|begin_of_text|>"
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, bos_id)]),
    ])
    _save(tok, "llama3", bos_token=bos, eos_token="<|eot_id|>", pad_token="<|end_of_text|>",
          chat_template=LLAMA3_TEMPLATE, model_max_length=131072,
          additional_special_tokens=specials[1:])


def make_gemma3() -> None:
    """SentencePiece-style BPE: spaces become ▁, unknown characters fall back to <0xNN> bytes."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
    ])
    # Train on a plain BPE first, then rebuild the model with the byte tokens in the vocab so
    # byte_fallback has something to fall back to (the trainer cannot add <0xNN> pieces itself).
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=specials + byte_tokens, show_progress=False)
    trainer_tok.train_from_iterator(corpus(), trainer=trainer)
    state = json.loads(trainer_tok.to_str())["model"]
    vocab: dict[str, int] = state["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(model)
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1",
                                                       special_tokens=[("<bos>", 2)])
    assert [tok.token_to_id(t) for t in specials[:4]] == [0, 1, 2, 3]
    _save(tok, "gemma3", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
          chat_template=GEMMA3_TEMPLATE, model_max_length=32768,
          additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])


if __name__ == "__main__":
    make_qwen2()
    make_llama3()
    make_gemma3()
