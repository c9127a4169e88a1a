"""The caption tokenizer: Hugging Face `tokenizers`, saved as a `transformers` fast tokenizer.

Parti used a 16k-piece SentencePiece model trained on its captions. Both kinds here
sit behind SentencePiece's Metaspace pre-tokenizer (words marked with "▁"): `unigram`
is SentencePiece's model (Kudo 2018); `bpe` merges frequent pairs. Unigram's seed
pieces are substrings shared by *distinct* words, so on a closed vocabulary of a few
dozen words (the synthetic captions) it stays at single characters; BPE counts word
frequencies and learns whole words there. The saved folder loads with
`transformers.AutoTokenizer.from_pretrained(folder)`.

Behaviour worth knowing:
- Text is NFKC-normalised (full-width letters, ligatures and the like become plain
  ones), then lower-cased when configured.
- Characters never seen in training become `<unk>` (a run of them, one `<unk>`);
  with `bpe`, letters, digits and ASCII punctuation are always in the vocabulary.
- Every sequence is `<s> ... </s>`; longer than `max_length`, it is cut on the right
  and still ends with `</s>`. `encode_captions` counts the captions it cut.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from parti_ops.model.config import TextTokenizerConfig

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]  # ids 0, 1, 2, 3 in this order


def train_text_tokenizer(
    captions: Sequence[str], config: TextTokenizerConfig
) -> PreTrainedTokenizerFast:
    """Train on `captions` (in a fixed order: same captions, same tokenizer, same files)."""
    if not captions:
        raise ValueError("no training captions: the accepted data has no rows in split 'train'")
    letters = string.ascii_lowercase if config.lowercase else string.ascii_letters
    alphabet = list(letters + string.digits + string.punctuation)
    if config.kind == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        trainer: trainers.Trainer = trainers.UnigramTrainer(
            vocab_size=config.vocab_size,
            special_tokens=SPECIAL_TOKENS,
            unk_token=UNK,
            show_progress=False,
        )
    else:
        tokenizer = Tokenizer(models.BPE(unk_token=UNK, fuse_unk=True))
        trainer = trainers.BpeTrainer(
            vocab_size=config.vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=alphabet,
            show_progress=False,
        )
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if config.lowercase else [])
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(captions, trainer=trainer, length=len(captions))
    if config.kind == "unigram":
        tokenizer = _canonical_unigram(tokenizer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, tokenizer.token_to_id(BOS)), (EOS, tokenizer.token_to_id(EOS))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=config.max_length,
        padding_side="right",
        truncation_side="right",
    )


def _canonical_unigram(tokenizer: Tokenizer) -> Tokenizer:
    """Unigram pieces in a fixed order, log-probabilities to 8 decimals.

    The trainer sums expected counts over threads in a varying order, so scores differ
    in the last digits from run to run; rounded and sorted by (score, piece) after the
    special tokens, the same captions give the same files.
    """
    body = json.loads(tokenizer.to_str())
    vocab = body["model"]["vocab"]
    specials = vocab[: len(SPECIAL_TOKENS)]
    if [piece for piece, _ in specials] != SPECIAL_TOKENS:
        raise RuntimeError(f"unigram trainer put {specials} first, not {SPECIAL_TOKENS}")
    rest = sorted(
        ((p, round(score, 8)) for p, score in vocab[len(specials) :]), key=lambda v: (-v[1], v[0])
    )
    body["model"]["vocab"] = specials + [list(v) for v in rest]
    return Tokenizer.from_str(json.dumps(body))


def load_text_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a folder written by `save_pretrained`; a clear error if it is not one."""
    folder = Path(path)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{folder}: no tokenizer.json; point at the output of `parti tokenizer text train`"
        )
    from transformers import AutoTokenizer  # loads torch: imported only where needed

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def encode_captions(
    tokenizer: PreTrainedTokenizerFast, captions: Sequence[str], max_length: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Captions → (ids (N, max_length) uint16 padded with <pad>, lengths (N,), number cut).

    One tokenizer pass: a sequence longer than `max_length` keeps its first
    `max_length - 1` tokens and its `</s>`, which is what the tokenizer's own truncation
    gives (text cut to fit, then `<s>`/`</s>` around it).
    """
    full = tokenizer(list(captions))["input_ids"]  # <s> … </s>, uncut
    ids = np.full((len(full), max_length), tokenizer.pad_token_id, dtype=np.uint16)
    lengths = np.empty(len(full), dtype=np.int64)
    truncated = 0
    for row, seq in enumerate(full):
        if len(seq) > max_length:
            seq = seq[: max_length - 1] + seq[-1:]
            truncated += 1
        ids[row, : len(seq)] = seq
        lengths[row] = len(seq)
    return ids, lengths, truncated
