"""Writes the data and the model folder of the RLHF pipeline demo (examples/rlhf/run.sh).

    python3 examples/rlhf/make_rlhf.py

The task: two-digit sums, "37+45=" -> "82". A hidden rule decides which response is better:
the answer alone, ended right after its digits, beats anything with text after the answer
("82 82", "82-3"), an empty response, or no number at all. Arithmetic is not judged, only the
format: the point is to see preferences steer a policy, not to teach it sums.

- sft.jsonl: prompt/response examples from a sloppy writer who adds text after the answer 70% of
  the time, so the fine-tuned policy mostly breaks the rule;
- pairs.jsonl: preference pairs {prompt, chosen, rejected}: the answer alone over a broken one,
  for the reward model and DPO (a few percent are held out by the configs);
- prompts.jsonl: prompts for PPO;
- held_out.jsonl: prompts no stage trains on, where the policies are judged by the rule.
The four sets of sums are disjoint. tiny_llama/ is the model's architecture (config.json) with
the character-level tokenizer of examples/arith/tiny_llama (no weights: SFT starts from random
ones, `model.init = "random"`).
"""
import json
import pathlib
import random
import re
import shutil

here = pathlib.Path(__file__).parent
rng = random.Random(1)
sums = [(a, b) for a in range(10, 100) for b in range(10, 100)]
rng.shuffle(sums)
held_out, ppo, pairs, sft = sums[:200], sums[200:1700], sums[1700:4700], sums[4700:]

GOOD = re.compile(r"[0-9]+")


def follows_rule(response):
    """The hidden rule: the response is the answer's digits and nothing else."""
    return GOOD.fullmatch(response) is not None


def broken(answer):
    """A response that breaks the rule: text after the answer (mostly), nothing, or no number."""
    d = lambda: str(rng.randrange(10))
    kind = rng.random()
    if kind < 0.7:
        tail = rng.choice([f" {answer}", f"-{d()}", f" {d()}{d()}", f"={answer}", f" +{d()}", "-"])
        return f"{answer}{tail}"
    if kind < 0.85:
        return ""
    return rng.choice(["-", " ", "+-", "= ="])


def write(name, rows):
    (here / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} lines to {here / name}")


if __name__ == "__main__":
    write("sft.jsonl", [{"prompt": f"{a}+{b}=", "response": str(a + b) if rng.random() < 0.3 else
                         f"{a + b}{rng.choice([' ' + str(a + b), '-' + str(rng.randrange(10)), ' ' + str(rng.randrange(100))])}"}
                        for a, b in sft])
    rows = []
    for a, b in pairs:
        rejected = broken(a + b)
        assert follows_rule(str(a + b)) and not follows_rule(rejected)
        rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": rejected})
    write("pairs.jsonl", rows)
    write("prompts.jsonl", [{"prompt": f"{a}+{b}="} for a, b in ppo])
    write("held_out.jsonl", [{"prompt": f"{a}+{b}="} for a, b in held_out])

    model = here / "tiny_llama"
    model.mkdir(exist_ok=True)
    arith = here.parent / "arith" / "tiny_llama"
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(arith / f, model / f)
    config = json.loads((arith / "config.json").read_text())
    config.update({"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 4, "max_position_embeddings": 32})
    (model / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    print(f"wrote {model}")
