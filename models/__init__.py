"""Example models built on pallas_flash: GPT-2 in Flax NNX, its training loop and generation."""

from models.generate import generate
from models.gpt2 import GPT2, GPT2Config, KVCache, cached_attention, load_hf_gpt2, save_hf_gpt2
from models.tokenizer import ByteTokenizer, load_corpus

__all__ = ["GPT2", "GPT2Config", "KVCache", "cached_attention", "load_hf_gpt2", "save_hf_gpt2",
           "generate", "ByteTokenizer", "load_corpus"]
