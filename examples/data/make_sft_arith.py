"""Writes examples/data/sft_arith.jsonl: small arithmetic questions and answers for the SFT demo
(configs/sft_demo.toml), half as prompt/response pairs and half as chat messages.

    python3 examples/data/make_sft_arith.py
"""
import json
import pathlib
import random

rng = random.Random(0)
out = pathlib.Path(__file__).with_name("sft_arith.jsonl")
lines = []
for i in range(400):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    op = rng.choice("+-")
    answer = a + b if op == "+" else a - b
    question = f"What is {a}{op}{b}?"
    if i % 2 == 0:
        lines.append({"prompt": question, "response": str(answer)})
    else:
        lines.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": str(answer)}]})
out.write_text("".join(json.dumps(line) + "\n" for line in lines))
print(f"wrote {len(lines)} examples to {out}")
