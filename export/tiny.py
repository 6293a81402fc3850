"""Tiny random checkpoints built from a config (tests, `edgefm-fleet run --model tiny`); no downloads."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "edge devices learn from their own data",
    "federated learning shares adapters not data",
    "a small model runs on a raspberry pi",
    "the coordinator aggregates low rank updates",
    "sensors report temperature and humidity every minute",
    "def main(): return 0",
    "import numpy as np",
    "hello world, this is a test.",
    "0123456789 + - * / = ( ) [ ] { }",
]


def make_tokenizer(out: Path, vocab_size: int = 384):
    """Train a byte-level BPE tokenizer on a tiny built-in corpus and save it HF-style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[CLS]", "[SEP]", "[PAD]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(out)
    return fast


def make_tiny_llama(
    out: str | Path,
    *,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
) -> Path:
    """Save a tiny random Llama-style causal LM (tied head, GQA) with a tokenizer to ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger-than-default init so logits are not all ~0 (parity checks mean something)
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(out)
    return out


def make_tiny_bert(
    out: str | Path, *, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4, num_labels: int = 3
) -> Path:
    """Save a tiny random BERT-style encoder with a classification head and a tokenizer to ``out``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
        num_labels=num_labels,
        pad_token_id=tok.pad_token_id,
    )
    BertForSequenceClassification(cfg).eval().save_pretrained(out)
    return out
