"""Loading and training tokenizers (offline)."""

import pytest

from medclipin.data.tokenizer import TokenizerError, load_tokenizer, train_wordpiece_tokenizer

CORPUS = [
    "No acute cardiopulmonary process.",
    "Small left pleural effusion with adjacent atelectasis.",
    "Heart size is normal. Lungs are clear.",
    "Moderate cardiomegaly and pulmonary edema.",
    "Right lower lobe consolidation concerning for pneumonia.",
] * 20


def test_train_wordpiece_and_reload_with_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    tok = train_wordpiece_tokenizer(CORPUS, vocab_size=200, out_dir=tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert loaded.cls_token == "[CLS]" and loaded.sep_token == "[SEP]" and loaded.pad_token == "[PAD]"
    assert loaded.mask_token == "[MASK]" and loaded.unk_token == "[UNK]"
    assert loaded.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 1, 2, 3, 4]
    enc = loaded("Pleural EFFUSION.", padding="max_length", max_length=12, truncation=True)
    tokens = loaded.convert_ids_to_tokens(enc["input_ids"])
    assert tokens[0] == "[CLS]" and "[SEP]" in tokens and tokens[-1] == "[PAD]"
    assert "effusion" in tokens and "[UNK]" not in tokens  # lower-cased, in vocabulary
    assert enc["input_ids"] == tok("Pleural EFFUSION.", padding="max_length", max_length=12)["input_ids"]
    assert loaded.decode(enc["input_ids"], skip_special_tokens=True) == "pleural effusion."
    long = loaded(" ".join(CORPUS), truncation=True, max_length=16)
    assert len(long["input_ids"]) == 16
    assert load_tokenizer(str(tmp_path / "tok")).vocab_size == loaded.vocab_size
    left = load_tokenizer(str(tmp_path / "tok"), truncation_side="left")
    ids = left("heart size is normal. no acute cardiopulmonary process.", truncation=True, max_length=5)["input_ids"]
    assert left.convert_ids_to_tokens(ids)[-3:] == ["process", ".", "[SEP]"]  # the end (impression) is kept


def test_train_cased_and_empty_corpus(tmp_path):
    tok = train_wordpiece_tokenizer(CORPUS, vocab_size=300, out_dir=tmp_path / "cased", lowercase=False)
    assert "Heart" in tok.convert_ids_to_tokens(tok("Heart")["input_ids"])
    with pytest.raises(TokenizerError):
        train_wordpiece_tokenizer(["", "  "], vocab_size=100, out_dir=tmp_path / "empty")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path / "emptydir"))
    with pytest.raises(TokenizerError, match="offline"):  # HF_HUB_OFFLINE=1 in conftest
        load_tokenizer("some-org/not-a-real-tokenizer-xyz")


def test_tokenizer_train_command_uses_train_split_only(tmp_path, capsys):
    from transformers import AutoTokenizer

    from medclipin.commands.tokenizer import main as tokenizer_main
    from medclipin.data.manifest import Record, write_manifest

    records = [Record(f"r{i}", f"p{i}", f"s{i}", "x.png", "train", findings=CORPUS[i % 5], impression="Stable.")
               for i in range(20)]
    records.append(Record("t0", "pt", "st", "x.png", "test", findings="zygomycosis " * 10))
    manifest = write_manifest(tmp_path / "m.csv", records)
    out = tmp_path / "tok"
    assert tokenizer_main(["train", "--manifest", str(manifest), "--vocab-size", "120", "--out", str(out),
                           "--sections", "findings", "impression", "--min-frequency", "1"]) == 0
    assert "5 unique train texts" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(str(out))
    assert "zygomycosis" not in tok.get_vocab()  # test-split text never shapes the vocabulary
    assert "stable" in tok.get_vocab()


def _report_corpus() -> list[str]:
    """A few hundred report-like sentences with many equally frequent word pieces (where tie-breaking shows)."""
    import random

    rng = random.Random(7)
    words = ("no acute cardiopulmonary process small left right pleural effusion adjacent atelectasis heart size "
             "normal lungs clear moderate cardiomegaly pulmonary edema lower lobe consolidation concerning for "
             "pneumonia pneumothorax nodule opacity stable unchanged since prior mild bibasilar").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) + "." for _ in range(400)]


TRAIN_SCRIPT = """
import sys
from medclipin.data.tokenizer import train_wordpiece_tokenizer
texts = open(sys.argv[1], encoding="utf-8").read().splitlines()
train_wordpiece_tokenizer(texts, vocab_size=int(sys.argv[2]), out_dir=sys.argv[3])
"""


def test_training_gives_byte_identical_tokenizers_in_any_process(tmp_path):
    """Same texts → the same vocabulary and ids, in this process and in two others (whose hash seeds differ)."""
    import os
    import subprocess
    import sys

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_report_corpus()), encoding="utf-8")
    here = train_wordpiece_tokenizer(_report_corpus(), vocab_size=150, out_dir=tmp_path / "here")
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, str(corpus), "150", str(tmp_path / name)], check=True,
                       env=env, timeout=300)
    expected = (tmp_path / "here" / "tokenizer.json").read_bytes()
    for name in ("a", "b"):
        assert (tmp_path / name / "tokenizer.json").read_bytes() == expected, name
    assert len(here) == 150 and here.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 1, 2, 3, 4]


def _textbook_wordpiece(word_counts: dict, vocab_size: int, min_frequency: int) -> list[str]:
    """BPE over the words' symbols, recounting every pair after every merge (slow and obviously right)."""
    vocab = ["[UNK]"]
    words = {w: [w[0], *("##" + c for c in w[1:])] for w in word_counts}
    vocab += sorted({c for w in words for c in w}) + sorted({s for sy in words.values() for s in sy[1:]})
    while len(vocab) < vocab_size:
        pairs: dict = {}
        for w, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] = pairs.get(pair, 0) + word_counts[w]
        if not pairs:
            break
        (a, b), n = min(pairs.items(), key=lambda item: (-item[1], item[0]))
        if n < min_frequency:
            break
        merged = a + b[2:]
        if merged not in vocab:
            vocab.append(merged)
        for w, symbols in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == (a, b):
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            words[w] = out
    return vocab


@pytest.mark.parametrize("vocab_size", [40, 120, 400])
def test_the_vocabulary_is_textbook_wordpiece_training(vocab_size):
    from collections import Counter

    from medclipin.data.tokenizer import learn_wordpiece_vocab

    counts = Counter(word for text in _report_corpus() for word in text.rstrip(".").split())
    counts.update({"aaaa": 3, "abab": 2})  # repeated symbols: merges inside a word never overlap
    learned = learn_wordpiece_vocab(counts, vocab_size, min_frequency=2, specials=["[UNK]"])
    assert list(learned) == _textbook_wordpiece(dict(counts), vocab_size, 2)
    assert list(learned.values()) == list(range(len(learned)))


def test_rare_words_such_as_names_and_ids_stay_out_of_the_trained_vocabulary(tmp_path):
    """W12 (issue 25): the run's tokenizer (saved with the model) held 'john', 'testpatient', 'mrn', '123456'
    from report text. By default (data.text.min_frequency=5) a word seen in a few reports is not learned."""
    from medclipin.config import load_config
    from medclipin.data.tokenizer import train_wordpiece_tokenizer

    reports = ["the heart size is normal and the lungs are clear"] * 40
    reports += ["patient johnsmith mrn 987654 small left effusion"] * 2
    default = load_config(None).data.text.min_frequency
    assert default >= 3
    vocab = train_wordpiece_tokenizer(reports, vocab_size=400, min_frequency=default).get_vocab()
    assert "heart" in vocab and "johnsmith" not in vocab and "987654" not in vocab
    vocab = train_wordpiece_tokenizer(reports, vocab_size=400, min_frequency=1).get_vocab()
    assert "johnsmith" in vocab and "987654" in vocab  # what the old default let in
