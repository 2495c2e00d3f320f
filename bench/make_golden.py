"""Write tests/golden/<model>_greedy.json: an independent reference for an embedded model.

Hugging Face transformers + torch (float32, CPU) load the same GGUF that `mlx_cai.models.load(<spec>)`
converts; transformers dequantizes the blocks (Q4_1/Q8_0 for smollm2-135m, Q4_K/Q6_K for qwen2.5-coder-1.5b)
to float32, the same weights our converter produces (on the CPU), so greedy decoding should match token for
token. Stored per conversation: the chat-template prompt ids, the
greedy completion ids (end token excluded, `finish` says whether one was produced), and the top-1 minus top-2
logit margin at every step (a tiny margin marks a near tie, where float rounding may legitimately flip the
argmax). Also stored: the transformers tokenizer's ids for a varied text sample.

Run with the bench venv (torch lives only there):

    .venv-bench/bin/python bench/make_golden.py                            # smollm2-135m
    .venv-bench/bin/python bench/make_golden.py --model qwen2.5-coder-1.5b  # the overseer (~3 min)

The overseer's GGUF is the verified assembly in $MLX_CAI_HOME/models/ (made by `make setup`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import platform
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
OUTS = {"smollm2-135m": "smollm2-135m_greedy.json", "qwen2.5-coder-1.5b": "qwen2.5-coder-1.5b_greedy.json"}
MAX_NEW_TOKENS = 48

# Fixed conversations of different lengths (so one batch needs left padding): default system prompt from
# the template, an explicit system prompt, and a multi-turn chat.
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a concise assistant. Answer in plain English."},
        {"role": "user", "content": "Explain in two sentences why the sky looks blue during the day."},
    ],
    [
        {"role": "user", "content": "Give me a name for a pet goldfish."},
        {"role": "assistant", "content": "How about Bubbles?"},
        {"role": "user", "content": "Nice. Now write a short Python function that returns the square of a number."},
    ],
]

# Tokenizer sample: unicode (accents, CJK, RTL, combining marks), code, numbers, emojis (incl. ZWJ and
# flags), whitespace runs, tabs, newlines, special-token text, contractions.
TOKENIZER_SAMPLES = [
    "Hello, world! It's a test; we'll see what they've done.",
    "Café naïve résumé — Zürich, São Paulo, Ærøskøbing. 東京は日本の首都です。 مرحبا بالعالم. Привет, мир!",
    "e\u0301 vs \u00e9; ﬁ ligature; Ω ≈ ∑ ∫ √2; ½ ¾; “smart quotes” ‘single’ «guillemets»",
    "def square(x: int) -> int:\n    \"\"\"Return x*x.\"\"\"\n    return x ** 2\n\nprint([square(i) for i in range(10)])\n",
    "if (a != b && c >= 0) { printf(\"%d\\n\", a << 3); } // C++ comment\n\t\tindent\ttabs",
    "Numbers: 0 7 42 123 1234 12345 1234567890 3.14159 -2.5e-10 1,000,000 0xFF 1st 2nd 3rd 2024-06-01T12:34:56Z",
    "Emojis: 😀🚀🔥 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️ ✅",
    "spaces:  two   three    four     five\n\n\nthree newlines\r\nCRLF  \t mixed \u00a0nbsp\u3000ideographic   ",
    "   leading and trailing spaces   ",
    "<|im_start|>user\nliteral special tokens<|im_end|> and <|endoftext|> inside text",
    "URL https://example.com/path?query=1&x=%20y#frag, email a.b+c@example.org, path C:\\Users\\me\\file.txt",
]


def gguf_path(spec: str) -> Path:
    sys.path.insert(0, str(ROOT))
    from mlx_cai import embedded

    try:
        return embedded.gguf_path(spec)
    except embedded.EmbeddedError as e:
        sys.exit(str(e))


def embedded_install(spec: str) -> str:
    from mlx_cai import embedded

    return embedded.get(spec).install


def as_ids(x) -> list[int]:
    """apply_chat_template returns a list in 4.x and a BatchEncoding in 5.x."""
    if hasattr(x, "keys") and "input_ids" in x:
        x = x["input_ids"]
    if hasattr(x, "tolist"):
        x = x.tolist()
    if x and isinstance(x[0], list):
        assert len(x) == 1
        x = x[0]
    return [int(t) for t in x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(OUTS))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    args = ap.parse_args()

    import tokenizers
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    args.out = args.out or GOLDEN / OUTS[args.model]
    path = gguf_path(args.model)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    eos = int(tok.eos_token_id)

    records = []
    for conv in CONVERSATIONS:
        prompt = as_ids(tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True))
        text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        inp = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(
                inp, attention_mask=torch.ones_like(inp), max_new_tokens=args.max_new_tokens, do_sample=False,
                temperature=None, top_p=None, top_k=None, repetition_penalty=1.0,
                pad_token_id=eos, eos_token_id=eos, output_scores=True, return_dict_in_generate=True,
            )
        new = [int(t) for t in out.sequences[0, len(prompt):].tolist()]
        margins = []
        for s in out.scores:  # processed scores: identical to raw logits for greedy with no processors
            top2 = torch.topk(s[0].float(), 2).values
            margins.append(round(float(top2[0] - top2[1]), 5))
        finish = "length"
        if eos in new:
            new = new[: new.index(eos)]
            finish = "stop"
            margins = margins[: len(new) + 1]
        records.append({
            "messages": conv,
            "prompt_text": text,
            "prompt_ids": prompt,
            "completion_ids": new,
            "completion_text": tok.decode(new),
            "finish": finish,
            "top2_logit_margin": margins,
        })
        print(f"prompt {len(prompt)} tokens -> {len(new)} new ({finish}), min margin {min(margins):.4f}: "
              f"{tok.decode(new)!r}")

    samples = [{"text": t, "ids": [int(i) for i in tok.encode(t, add_special_tokens=False)]} for t in TOKENIZER_SAMPLES]
    for s in samples:
        assert tok.decode(s["ids"]) == s["text"], f"transformers does not round-trip {s['text']!r}"

    script = Path(sys.argv[0]).resolve()
    script = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    cmd = " ".join(shlex.quote(a) for a in [".venv-bench/bin/python", str(script), *sys.argv[1:]])
    golden = {
        "how": (
            f"Made by `{cmd}` on {dt.date.today().isoformat()}: "
            f"transformers {transformers.__version__} AutoTokenizer/AutoModelForCausalLM.from_pretrained(<dir of the {args.model} GGUF>, "
            f"gguf_file='{path.name}', dtype=torch.float32) (GGUF dequantized to float32 by transformers' gguf "
            f"loader, gguf {importlib.metadata.version('gguf')}), torch {torch.__version__} on CPU "
            f"({platform.machine()}, {torch.get_num_threads()} threads); prompts = tokenizer.apply_chat_template("
            f"messages, add_generation_prompt=True) with the GGUF's chat template; each conversation decoded alone "
            f"(batch 1, no padding) with model.generate(max_new_tokens={args.max_new_tokens}, do_sample=False, "
            f"repetition_penalty=1.0); completion_ids exclude the end token (finish='stop' means it was produced); "
            f"top2_logit_margin = top-1 minus top-2 logit at each step. Tokenizer samples: "
            f"tokenizer.encode(text, add_special_tokens=False) (tokenizers {tokenizers.__version__})."
        ),
        "model": {"install": embedded_install(args.model), "file": path.name, "spec": args.model},
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "tokenizers": tokenizers.__version__, "gguf": importlib.metadata.version("gguf"),
                     "python": platform.python_version()},
        "max_new_tokens": args.max_new_tokens,
        "eos_token_id": eos,
        "conversations": records,
        "tokenizer_samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
