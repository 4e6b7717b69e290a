"""transformers' greedy `generate` on a model folder: generated tokens per second for a batch of
random prompts, every sequence forced to its full length. Prints one JSON line.

    python3 bench/hf_generate.py --model DIR --batch 32 --prompt-len 16 --new-tokens 64
"""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--batch", type=int, default=1)
p.add_argument("--prompt-len", type=int, default=16)
p.add_argument("--new-tokens", type=int, default=64)
p.add_argument("--repeats", type=int, default=3)
args = p.parse_args()

model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
g = torch.Generator().manual_seed(0)
prompts = torch.randint(0, 256, (args.batch, args.prompt_len), generator=g)
kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
              attention_mask=torch.ones_like(prompts), pad_token_id=model.config.pad_token_id)
with torch.inference_mode():
    model.generate(prompts, **kwargs)  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = model.generate(prompts, **kwargs)
        times.append(time.perf_counter() - t0)
assert out.shape[1] == args.prompt_len + args.new_tokens
best = min(times)
print(json.dumps({"framework": "transformers", "batch": args.batch, "new_tokens": args.new_tokens,
                  "time_s": best, "tokens_per_s": args.batch * args.new_tokens / best,
                  "threads": torch.get_num_threads()}))
