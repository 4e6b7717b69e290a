"""Creates the generation benchmark's model: a randomly initialised Llama (GQA, 4 layers,
hidden 256) with the test fixtures' byte-level BPE tokenizer, saved as a Hugging Face folder.

    python3 bench/make_bench_llama.py OUT_DIR
"""
import pathlib
import shutil
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

out = pathlib.Path(sys.argv[1])
fixture = pathlib.Path(__file__).resolve().parent.parent / "trainer/tests/fixtures/hf/llama_tiny"
torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=320, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
    rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=315, eos_token_id=316, pad_token_id=319,
)
model = LlamaForCausalLM(config).eval()
model.save_pretrained(out, safe_serialization=True)
for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
    shutil.copy(fixture / name, out / name)
print(f"wrote {out}")
