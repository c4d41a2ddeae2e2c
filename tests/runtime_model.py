"""A tiny but complete HF model folder for runtime tests (engine API, CLI, chat, server).

Owns :func:`build_runtime_model`: a byte-level BPE tokenizer trained on a few
sentences (ChatML special tokens and chat template in
``tokenizer_config.json``) next to a tiny random-init ``qwen3_moe`` model from
:mod:`tiny_models` whose vocabulary matches it. Real files, no mocks.

Knows nothing about the engine.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tiny_models import build_tiny_hf_model

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts models route each token to a few experts.",
    "Memory budgets decide which experts stay resident.",
    "Hello, how are you today? I am fine, thank you.",
    "Caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \U0001f600 emoji and accents.",
] * 4


def train_tokenizer(vocab_size: int = 320) -> Tokenizer:
    """A byte-level BPE (every byte is a token, so random ids can split UTF-8 characters)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    return tok


def build_runtime_model(path: str | Path, seed: int = 0) -> Path:
    """Write a loadable model folder (config, weights, tokenizer files) to ``path``.

    Args:
        path: output folder.
        seed: weight seed.

    Returns:
        The folder.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    eos = tok.token_to_id("<|im_end|>")
    build_tiny_hf_model("qwen3_moe", path, seed=seed, overrides={
        "vocab_size": tok.get_vocab_size(), "eos_token_id": eos, "bos_token_id": None,
        "pad_token_id": tok.token_to_id("<|endoftext|>"), "max_position_embeddings": 512,
    })
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": CHATML,
    }, indent=2))
    return path


def subprocess_env() -> dict[str, str]:
    """Environment for child ``python -m moestream...`` processes: one thread, no progress bars."""
    import os

    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    return env
