"""TRL's GRPOTrainer on CPU, timed per RL step: the reference side of bench/grpo_compare.sh.

    python3 bench/grpo_trl.py --model DIR --prompts examples/arith/prompts.jsonl \
        [--prompts-per-step 16] [--group-size 8] [--max-new-tokens 4] [--steps 20] [--warmup-steps 1]

One RL step is one optimizer step over `prompts-per-step` prompts × `group-size` completions
(generated in one batch, as rtrain's step does), with the settings rtrain's GRPO uses by default:
no KL term (beta 0), one pass over the batch, clip range [1 - 0.2, 1 + 0.28], token-mean loss,
no activation recomputation.
Reward: 1 when the completion's last number equals the line's `answer`, else 0 (rtrain's
`numeric` reward). Prints one JSON line: seconds per step and generated tokens (completion
lengths, EOS included, as rtrain counts them) per second over the steps after the warm-up.
"""
import argparse
import dataclasses
import json
import re
import sys
import tempfile
import time

import torch

LAST_NUMBER = re.compile(r"-?\d+")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--prompts", required=True, help='JSONL with "prompt" and "answer"')
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=64, help="completions per forward/backward (rtrain: train.micro_batch)")
    p.add_argument("--steps", type=int, default=20, help="timed RL steps")
    p.add_argument("--warmup-steps", type=int, default=1, help="RL steps run first and not timed")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    return p.parse_args()


def grpo_config(args, output_dir):
    from trl import GRPOConfig

    completions = args.prompts_per_step * args.group_size
    micro = min(args.micro_batch, completions)
    if completions % micro or micro % args.group_size:
        sys.exit(f"grpo_trl: micro-batch {micro} must divide {completions} completions and be a multiple of the group size")
    required = dict(
        output_dir=output_dir,
        # One optimizer step = one generation batch of prompts_per_step × group_size completions.
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=completions // micro,
        num_generations=args.group_size,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
        max_steps=args.warmup_steps + args.steps,
        learning_rate=args.lr,
        beta=0.0,
        num_iterations=1,
        epsilon=0.2,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        seed=args.seed,
        # TRL's GRPOConfig turns activation recomputation on by default; rtrain does not recompute.
        gradient_checkpointing=False,
    )
    # Settings that match rtrain's defaults where this TRL version has them.
    optional = dict(
        steps_per_generation=completions // micro,
        epsilon_high=0.28,
        loss_type="dapo",
        top_p=1.0,
        log_completions=False,
        activation_checkpointing=False,
    )
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    missing = sorted(k for k in required if k not in fields)
    if missing:
        sys.exit(f"grpo_trl: this TRL's GRPOConfig lacks {missing}")
    skipped = sorted(k for k in optional if k not in fields)
    if skipped:
        print(f"grpo_trl: this TRL's GRPOConfig has no {skipped}; left at its defaults", file=sys.stderr)
    return GRPOConfig(**required, **{k: v for k, v in optional.items() if k in fields})


def main():
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import transformers
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    dataset = load_dataset("json", data_files=args.prompts, split="train")
    dataset = dataset.select_columns(["prompt", "answer"])

    # Generated tokens per RL step, counted where TRL hands the completions to the reward.
    generated = {"tokens": 0, "completions": 0, "correct": 0}

    def last_number_reward(completions, answer, completion_ids, **_):
        rewards = []
        for text, want, ids in zip(completions, answer, completion_ids):
            numbers = LAST_NUMBER.findall(text)
            ok = bool(numbers) and int(numbers[-1]) == int(want)
            rewards.append(1.0 if ok else 0.0)
            generated["tokens"] += len(ids)
            generated["completions"] += 1
            generated["correct"] += ok
        return rewards

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps = []  # (seconds, generated tokens, completions, correct) per optimizer step
            self.started = None

        def on_step_begin(self, *_, **__):
            generated.update(tokens=0, completions=0, correct=0)
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.steps.append((time.perf_counter() - self.started, generated["tokens"], generated["completions"], generated["correct"]))

    with tempfile.TemporaryDirectory(prefix="grpo-trl-") as output_dir:
        timer = StepTimer()
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=last_number_reward,
            args=grpo_config(args, output_dir),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        # Generation alone, beside the whole step: wraps TRL's call into `model.generate`.
        gen_seconds = []
        generate = trainer._generate_single_turn

        def timed_generate(*a, **kw):
            start = time.perf_counter()
            out = generate(*a, **kw)
            gen_seconds.append(time.perf_counter() - start)
            return out

        trainer._generate_single_turn = timed_generate
        trainer.train()

    expected = args.prompts_per_step * args.group_size
    timed = timer.steps[args.warmup_steps:]
    if len(timed) != args.steps or any(c != expected for _, _, c, _ in timed):
        sys.exit(f"grpo_trl: expected {args.steps} timed steps of {expected} completions, got "
                 f"{[(round(s, 3), c) for s, _, c, _ in timed]}")
    seconds = sum(s for s, _, _, _ in timed)
    tokens = sum(t for _, t, _, _ in timed)
    gen_timed = gen_seconds[args.warmup_steps:]
    print(json.dumps({
        "framework": "trl",
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": len(timed),
        "prompts_per_step": args.prompts_per_step,
        "group_size": args.group_size,
        "max_new_tokens": args.max_new_tokens,
        "step_time_s": seconds / len(timed),
        "generated_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "generate_tokens_per_s": tokens / sum(gen_timed) if gen_timed else None,
        "response_length": tokens / (len(timed) * expected),
        "accuracy": sum(c for _, _, _, c in timed) / (len(timed) * expected),
    }))


if __name__ == "__main__":
    main()
