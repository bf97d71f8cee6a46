"""Tokenizers built offline: byte-level BPE, with no merges (tests) or trained on a corpus (the models
trained here), wrapped as ``PreTrainedTokenizerFast`` with the special tokens a family needs."""

from __future__ import annotations

LLAVA_SPECIALS = ("<pad>", "<s>", "</s>", "<image>")


def _byte_level(tok):
    from tokenizers import decoders, pre_tokenizers

    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _wrap(tok, pad: str, eos: str, bos: str | None, image: str | None):
    from transformers import PreTrainedTokenizerFast

    extra = {"extra_special_tokens": {"image_token": image}} if image else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos,
                                   **({"bos_token": bos} if bos else {}), **extra,
                                   model_input_names=["input_ids", "attention_mask"])


def byte_tokenizer(specials=LLAVA_SPECIALS, pad: str = "<pad>", eos: str = "</s>", bos: str | None = "<s>",
                   image: str | None = "<image>"):
    """A byte-level BPE tokenizer with no merges and ``specials`` added after the 256 bytes."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = _byte_level(Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[])))
    tok.add_special_tokens(list(specials))
    return _wrap(tok, pad, eos, bos, image)


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, with <pad> <s> </s> <image> as special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(LLAVA_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return _wrap(tok, "<pad>", "</s>", "<s>", "<image>")
