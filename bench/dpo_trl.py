"""TRL's DPOTrainer on CPU, timed per optimizer step: the reference side of bench/dpo_compare.sh.

    python3 bench/dpo_trl.py --model DIR --pairs PAIRS.jsonl \
        [--batch 16] [--steps 10] [--warmup-steps 2] [--beta 0.1] [--lr 1e-4] [--max-length 32]

One step is one optimizer step over `batch` pairs (per_device_train_batch_size = batch, no
gradient accumulation), with the settings rtrain's DPO uses: the sigmoid loss (or `--loss`),
a frozen reference model run on every batch (no precomputed reference log-probs), fp32, no
activation recomputation (TRL's default turns it on), AdamW, gradient clip 1.0, sequences cut to
`max-length` tokens keeping their start. No evaluation, no saving, logging off.

A callback records when each optimizer step begins and ends. Prints one JSON line over the steps
after the warm-up: `step_time_s`, the wall time from one step's end to the next (what the whole
step costs, fetching and collating the batch included, as rtrain's step time includes it), and
`compute_time_s`, from the step's begin callback to its end (the batch already collated), with
their medians, and the tokens per step (prompt + response of both rows of every pair, padding
excluded: what rtrain counts).
"""
import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--pairs", required=True, help='JSONL with "prompt", "chosen" and "rejected" (text)')
    p.add_argument("--batch", type=int, default=16, help="pairs per optimizer step")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup-steps", type=int, default=2, help="optimizer steps run first and not timed (>= 1)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--loss", default="sigmoid", help="TRL loss_type (rtrain's dpo.loss: sigmoid, robust, ipo)")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=32, help="tokens per sequence, prompt included (rtrain: data.max_len)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0: torch's default)")
    return p.parse_args()


def dpo_config(args, output_dir):
    from trl import DPOConfig

    required = dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.warmup_steps + args.steps,
        learning_rate=args.lr,
        beta=args.beta,
        loss_type=[args.loss],
        label_smoothing=args.label_smoothing,
        max_length=args.max_length,
        truncation_mode="keep_start",
        precompute_ref_log_probs=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        max_grad_norm=1.0,
        weight_decay=0.0,
        warmup_steps=0,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=args.seed,
    )
    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    missing = sorted(k for k in required if k not in fields)
    if missing:
        sys.exit(f"dpo_trl: this TRL's DPOConfig lacks {missing}")
    # DPOConfig turns activation recomputation on by default; rtrain does not recompute.
    # transformers 5.x names it activation_checkpointing (gradient_checkpointing is its old alias).
    off = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return DPOConfig(**required, **{off: False})


def main():
    args = parse_args()
    if args.warmup_steps < 1 or args.steps < 1 or args.batch < 1:
        sys.exit("dpo_trl: --steps, --batch and --warmup-steps must be at least 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import transformers
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    dataset = load_dataset("json", data_files=args.pairs, split="train")
    dataset = dataset.select_columns(["prompt", "chosen", "rejected"])

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.end, self.tokens = [], [], []
            self.trainer = None

        def on_train_begin(self, *_, **__):
            self.end.append(time.perf_counter())  # the first step's "previous end": not timed (warm-up)
            self.tokens.append(self.trainer._total_train_tokens)

        def on_step_begin(self, *_, **__):
            self.begin.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            self.end.append(time.perf_counter())
            self.tokens.append(self.trainer._total_train_tokens)

    with tempfile.TemporaryDirectory(prefix="dpo-trl-") as output_dir:
        timer = StepTimer()
        trainer = DPOTrainer(
            model=model,
            args=dpo_config(args, output_dir),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        timer.trainer = trainer
        # What TRL feeds the model: the first pair's ids (for the comparison with rtrain's encoding).
        first = trainer.train_dataset[0]
        trainer.train()
        # Checked after training: the Trainer switches recomputation on when training starts.
        recomputes = getattr(trainer.model, "is_activation_checkpointing", None)
        if recomputes is None:
            recomputes = getattr(trainer.model, "is_gradient_checkpointing", False)
        if recomputes:
            sys.exit("dpo_trl: the model recomputed activations (activation checkpointing was on)")

    n = args.warmup_steps + args.steps
    if len(timer.begin) != n or len(timer.end) != n + 1:
        sys.exit(f"dpo_trl: expected {n} optimizer steps, the callback saw {len(timer.begin)} begin and {len(timer.end) - 1} end")
    whole = [timer.end[i + 1] - timer.end[i] for i in range(n)][args.warmup_steps:]
    compute = [timer.end[i + 1] - timer.begin[i] for i in range(n)][args.warmup_steps:]
    tokens = [timer.tokens[i + 1] - timer.tokens[i] for i in range(n)][args.warmup_steps:]
    print(json.dumps({
        "framework": "trl",
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
        "optim": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
        "activation_checkpointing": bool(recomputes),
        "steps": len(whole),
        "batch": args.batch,
        "pairs_in_dataset": len(trainer.train_dataset),
        "step_time_s": statistics.mean(whole),
        "step_time_median_s": statistics.median(whole),
        "compute_time_s": statistics.mean(compute),
        "compute_time_median_s": statistics.median(compute),
        "step_times_s": [round(s, 4) for s in whole],
        "tokens_per_step": statistics.mean(tokens),
        "first_pair_ids": {k: first[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")},
    }))


if __name__ == "__main__":
    main()
