"""Loads a built-in GPT exported by rtrain (`<run>/model`) with transformers and checks it against
rtrain: the tokenizer gives one token per byte (id = byte value), the log-probabilities of TEXT
match `rtrain score --json` (SCORE, one JSON object per token), and greedy generation from PROMPT
gives rtrain's CONTINUATION.

    python3 tests/scripts/check_gpt_export.py MODEL_DIR SCORE.jsonl TEXT PROMPT CONTINUATION
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, score, text, prompt, continuation = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
ids = tok(text)["input_ids"]
assert ids == list(text.encode()), f"token ids are not the bytes: {ids}"
rows = [json.loads(line) for line in open(score)]
assert ids == [r["token_id"] for r in rows], f"transformers {ids}, rtrain {[r['token_id'] for r in rows]}"
with torch.no_grad():
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
diff = max(abs(logp[t - 1, ids[t]].item() - rows[t]["logprob"]) for t in range(1, len(ids)))
assert diff < 1e-4, f"log-probabilities differ by {diff}"
prompt_ids = tok(prompt)["input_ids"]
new = len(continuation.encode())
out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=new, do_sample=False, pad_token_id=0)
got = tok.decode(out[0][len(prompt_ids):])
assert got == continuation, f"transformers continues {got!r}, rtrain {continuation!r}"
print(f"transformers loads the export ({type(model).__name__}); log-probs within {diff:.1e}; same greedy text")
