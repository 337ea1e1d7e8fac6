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
