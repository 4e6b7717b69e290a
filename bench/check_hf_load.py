"""Checks that transformers loads a model folder as rtrain does: the same token ids for TEXT
(`<s>` then one token per character) and the same log-probabilities as `rtrain score`.

    rtrain score --model MODEL --text TEXT --json > score.jsonl
    python3 bench/check_hf_load.py MODEL score.jsonl TEXT

Used by bench/grpo_compare.sh and bench/dpo_compare.sh before they compare rtrain with TRL.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, score, text = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
ids = tok(text)["input_ids"]
rows = [json.loads(l) for l in open(score)]
assert ids == [r["token_id"] for r in rows], f"token ids differ: transformers {ids}, rtrain {[r['token_id'] for r in rows]}"
assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1, \
    f"expected <s> and {len(text)} characters, got {ids}"
with torch.no_grad():
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
ours = [logp[t - 1, ids[t]].item() for t in range(1, len(ids))]
diff = max(abs(a - r["logprob"]) for a, r in zip(ours, rows[1:]))
assert diff < 1e-3, f"log-probabilities differ by {diff}"
print(f"== transformers loads the model ({type(model).__name__}, {type(tok).__name__}); "
      f"log-probs match rtrain's within {diff:.1e}")
