"""Builds the demo models' tokenizer: a byte-level BPE (GPT-2 style) trained on the shapes task's text.

Byte-level BPE is what current LLMs use (and what llama.cpp's "gpt2" tokenizer type reproduces), so
the demo exercises the same tokenizer path as a real model; any text still encodes (bytes fall back).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .data import shapes

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>"]  # ids 0..3


def build_demo_tokenizer(template: str = "USER: <image>\n{question} ASSISTANT:") -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    corpus = []
    for line in shapes.vocabulary_corpus():
        corpus.append(template.replace("<image>", "").replace("{question}", line) + " " + line)
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so every word of the task becomes one token.
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    return tok
