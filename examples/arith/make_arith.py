"""Writes the data and the model folder of the GRPO demo (configs/grpo_arith.toml): two-digit addition, "37+45=" → "82".

    python3 examples/arith/make_arith.py

- sft.jsonl: 500 prompt/response pairs for the first phase (supervised fine-tuning from random
  weights, configs/grpo_arith_sft.toml). So few that the model learns them by heart (1500 steps,
  about 190 passes over them) and gets only some of the other sums right: a confident model with
  the format and part of the arithmetic, which GRPO then generalises;
- prompts.jsonl: prompts with their `answer` for GRPO; the last 200 are held out for the
  before/after evaluation (rl.eval_path names them separately, so no sum is trained on).
The three sets are disjoint. tiny_llama/ is the model's architecture and character-level
tokenizer (no weights: the first phase starts from random ones, `model.init = "random"`).
"""
import json
import pathlib
import random

here = pathlib.Path(__file__).parent
rng = random.Random(0)
pairs = [(a, b) for a in range(100) for b in range(100)]
rng.shuffle(pairs)
held_out, rl, sft = pairs[:200], pairs[200:5200], pairs[5200:5700]


def write(name, rows):
    (here / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} lines to {here / name}")


write("sft.jsonl", [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a, b in sft])
write("prompts.jsonl", [{"prompt": f"{a}+{b}=", "answer": a + b} for a, b in rl])
write("held_out.jsonl", [{"prompt": f"{a}+{b}=", "answer": a + b} for a, b in held_out])


chars = list("0123456789+=- ")
vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
for c in chars:
    vocab[c] = len(vocab)
special = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
            "special": True} for t, i in list(vocab.items())[:3]]
bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
tokenizer = {
    "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
    "normalizer": None, "pre_tokenizer": None,
    # Encoding with special tokens puts <s> first, as Llama tokenizers do.
    "post_processor": {"type": "TemplateProcessing",
                       "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                       "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                       "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
    "decoder": {"type": "Fuse"},
    # BPE without merges: one token per character.
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
              "vocab": vocab, "merges": []},
}
config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(vocab), "hidden_size": 64,
          "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
          "max_position_embeddings": 32, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
          "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
          "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32"}
tokenizer_config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "model_max_length": 32,
                    "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
model = here / "tiny_llama"
model.mkdir(exist_ok=True)
for name, doc in [("tokenizer.json", tokenizer), ("config.json", config), ("tokenizer_config.json", tokenizer_config)]:
    (model / name).write_text(json.dumps(doc, indent=1) + "\n")
print(f"wrote the model folder {model}")
