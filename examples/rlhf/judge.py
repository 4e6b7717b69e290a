"""Judges the RLHF pipeline's policies by the hidden rule and prints the final table.

    python3 examples/rlhf/judge.py RUN_DIR

Reads RUN_DIR/generations_{sft,ppo,dpo}.jsonl (`rtrain generate --prompts ... --json` on the
held-out prompts) and the reward model's held-out accuracy from RUN_DIR/rlhf_rm/summary.json;
writes RUN_DIR/rlhf_summary.json with `rm_eval_accuracy` and `win_rate` ({sft, ppo, dpo}: the
share of sampled responses that follow the rule).
"""
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from make_rlhf import follows_rule  # noqa: E402

POLICIES = ["sft", "ppo", "dpo"]


def main(run_dir):
    win_rate, samples = {}, {}
    for policy in POLICIES:
        lines = (run_dir / f"generations_{policy}.jsonl").read_text().splitlines()
        outputs = [json.loads(line) for line in lines if line.strip()]
        if not outputs:
            sys.exit(f"judge: no generations for {policy} in {run_dir}")
        # A response follows the rule only when the policy ended it itself (EOS), not when it ran
        # out of tokens.
        wins = sum(o["finish_reason"] == "stop" and follows_rule(o["text"]) for o in outputs)
        win_rate[policy], samples[policy] = wins / len(outputs), len(outputs)
    rm = json.loads((run_dir / "rlhf_rm" / "summary.json").read_text())
    rm_accuracy = rm["preference"]["eval_after"]["accuracy"]
    summary = {"rm_eval_accuracy": rm_accuracy, "win_rate": win_rate, "samples": samples,
               "rule": "the response is the answer's digits alone, ended by the policy"}
    (run_dir / "rlhf_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(f"reward model, held-out pair accuracy: {rm_accuracy * 100:.1f}%")
    print(f"{'policy':<8} {'win rate':>9}   (held-out prompts, {samples['sft']} samples each, temperature 1)")
    for policy in POLICIES:
        print(f"{policy:<8} {win_rate[policy] * 100:>8.1f}%")
    print(f"written to {run_dir / 'rlhf_summary.json'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 examples/rlhf/judge.py RUN_DIR")
    main(pathlib.Path(sys.argv[1]))
