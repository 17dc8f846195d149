"""Byte-level BPE tokenizer trained on the pretraining split, wrapped for transformers.

Special tokens: id 0 `<|endoftext|>` (bos = eos, GPT-2 style; it separates documents) and id 1
`<|pad|>` (padding only; never trained on). Nothing is added to an encoded text automatically: the
pretraining rows start at document starts, so a prompt at position 0 looks like training data.

The wrapper is built with `PreTrainedTokenizerFast(tokenizer_object=...)`. Do not rebuild it from
vocab/merges files with `GPT2TokenizerFast(vocab_file=..., merges_file=...)`: under transformers 5.x
that silently encodes everything to [] (the tests round-trip real text through save and load).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]  # ids 0 and 1, as MemoryLMConfig's defaults expect


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 pre-tokenisation, all 256 bytes in the alphabet)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"special token {t} got id {tok.token_to_id(t)}, expected {i}")
    return tok


def wrap(tok: Tokenizer, model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around a trained `tokenizers.Tokenizer`."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=None,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def build_tokenizer(
    texts: Iterable[str], vocab_size: int = 8192, model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    return wrap(train_bpe(texts, vocab_size), model_max_length)


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of whole texts, no special tokens, no length warning (texts may exceed the model length)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    tokenizer.save_pretrained(str(out_dir))


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a saved tokenizer (the model directory or a tokenizer directory)."""
    return AutoTokenizer.from_pretrained(str(path))
