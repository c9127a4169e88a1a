import numpy as np
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from parti_ops.model.config import TextTokenizerConfig
from parti_ops.model.scenes import describe, sample_scene
from parti_ops.model.text_tokenizer import (
    BOS,
    EOS,
    PAD,
    UNK,
    encode_captions,
    load_text_tokenizer,
    train_text_tokenizer,
)


@pytest.fixture(scope="module")
def captions() -> list[str]:
    rng = np.random.default_rng(0)
    return [describe(sample_scene(rng, heldout=False), rng) for _ in range(400)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, captions):
    out = tmp_path_factory.mktemp("text_tokenizer")
    train_text_tokenizer(captions, TextTokenizerConfig(max_length=48)).save_pretrained(out)
    return out


def test_auto_tokenizer_round_trips_captions(saved, captions):
    tokenizer = AutoTokenizer.from_pretrained(saved, local_files_only=True)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    for caption in captions:
        ids = tokenizer(caption)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert UNK not in tokenizer.convert_ids_to_tokens(ids)
        assert tokenizer.decode(ids, skip_special_tokens=True) == caption.lower()


def test_special_tokens_have_fixed_ids(saved):
    tokenizer = load_text_tokenizer(saved)
    assert tokenizer.convert_tokens_to_ids([PAD, UNK, BOS, EOS]) == [0, 1, 2, 3]
    assert tokenizer.pad_token == PAD and tokenizer.unk_token == UNK


def test_caption_words_become_whole_tokens(saved):
    tokenizer = load_text_tokenizer(saved)
    pieces = tokenizer.tokenize("a large red circle in the top left corner")
    assert pieces == ["▁a", "▁large", "▁red", "▁circle", "▁in", "▁the", "▁top", "▁left", "▁corner"]


def test_unknown_characters_become_one_unk_per_run(saved):
    tokenizer = load_text_tokenizer(saved)
    pieces = tokenizer.tokenize("a red ✓✓ circle")
    assert pieces.count(UNK) == 1
    ids = tokenizer("a red ✓✓ circle")["input_ids"]
    assert tokenizer.decode(ids[1:-1]) == f"a red {UNK} circle"
    # Letters, digits and punctuation never seen in the captions still have tokens.
    assert UNK not in tokenizer.tokenize("zebra #42 quiz!")


def test_text_is_nfkc_normalised_and_lowercased(saved):
    tokenizer = load_text_tokenizer(saved)
    # Full-width letters (NFKC) and capitals map onto the trained lower-case words.
    assert tokenizer.tokenize("Ａ ＲＥＤ Circle") == tokenizer.tokenize("a red circle")


def test_over_long_captions_are_cut_counted_and_still_end_with_eos(saved, captions):
    tokenizer = load_text_tokenizer(saved)
    long = " and ".join(captions[:10])
    ids, lengths, truncated = encode_captions(tokenizer, [captions[0], long], 48)
    assert ids.dtype == np.uint16 and ids.shape == (2, 48)
    assert truncated == 1
    assert lengths[1] == 48 and ids[1, -1] == tokenizer.eos_token_id
    assert ids[1].tolist() == tokenizer(long, truncation=True, max_length=48)["input_ids"]
    assert lengths[0] < 48 and (ids[0, lengths[0] :] == tokenizer.pad_token_id).all()
    assert ids[0, lengths[0] - 1] == tokenizer.eos_token_id


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_training_is_deterministic_file_for_file(tmp_path, captions, kind):
    config = TextTokenizerConfig(kind=kind, vocab_size=300)
    for name in ("a", "b"):
        train_text_tokenizer(captions, config).save_pretrained(tmp_path / name)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "tokenizer.json" in files
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_unigram_learns_pieces_on_a_varied_corpus(tmp_path):
    rng = np.random.default_rng(1)
    syllables = ["ka", "lo", "mi", "ren", "tu", "sha", "vo", "pel", "dri", "nu"]
    words = ["".join(rng.choice(syllables, size=rng.integers(2, 4))) for _ in range(400)]
    corpus = [" ".join(rng.choice(words, size=8)) for _ in range(2000)]
    tokenizer = train_text_tokenizer(corpus, TextTokenizerConfig(kind="unigram", vocab_size=200))
    tokenizer.save_pretrained(tmp_path)
    loaded = load_text_tokenizer(tmp_path)
    ids = loaded(corpus[0])["input_ids"]
    assert len(ids) - 2 < len(corpus[0].replace(" ", ""))  # pieces longer than characters
    assert loaded.decode(ids, skip_special_tokens=True) == corpus[0]


def test_no_captions_and_missing_folder_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no training captions"):
        train_text_tokenizer([], TextTokenizerConfig())
    with pytest.raises(FileNotFoundError, match="parti tokenizer text train"):
        load_text_tokenizer(tmp_path)
