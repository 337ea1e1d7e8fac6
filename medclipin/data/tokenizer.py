"""Tokenizers: load any Hugging Face tokenizer (hub name or local folder), or train a domain WordPiece.

Trained tokenizers are built with the ``tokenizers`` library and wrapped in
``PreTrainedTokenizerFast`` -- in transformers 5.x ``BertTokenizer(vocab_file=...)`` silently ignores
the vocabulary file, and ``AutoTokenizer`` cannot load a folder that holds only ``vocab.txt``. The
saved folder (``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``) loads
with ``AutoTokenizer.from_pretrained(out_dir)``.
"""

from __future__ import annotations

import heapq
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from medclipin.errors import MedclipinError

__all__ = ["TokenizerError", "load_tokenizer", "train_wordpiece_tokenizer", "learn_wordpiece_vocab", "save_tokenizer",
           "SPECIAL_TOKENS"]

SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
CONTINUATION = "##"  # WordPiece's prefix of a sub-word that continues a word


class TokenizerError(MedclipinError, OSError):
    """A tokenizer cannot be loaded or trained; the message says why and what to do."""


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, *, truncation_side: str | None = None):
    """Load a tokenizer with ``AutoTokenizer`` from a local folder or a hub name.

    Args:
        name_or_path: a ``save_pretrained`` folder (e.g. from :func:`train_wordpiece_tokenizer`), a
            hub id such as ``emilyalsentzer/Bio_ClinicalBERT`` (needs network or the HF cache), or a
            weights spec ``package:<name>`` / ``hub:<id>`` (:mod:`medclipin.models.weights`).
        trust_remote_code: passed to ``AutoTokenizer`` (only for hub repos you trust).
        truncation_side: ``"right"`` or ``"left"`` (``TextConfig.truncation_side``); None keeps the
            tokenizer's own setting.

    Raises:
        TokenizerError: the folder does not exist / holds no tokenizer, or the hub name cannot be
            resolved (offline and not cached); the message names ``name_or_path``.
    """
    from transformers import AutoTokenizer

    if not name_or_path:
        raise TokenizerError("no tokenizer given: set data.text.tokenizer to a hub name or a local folder")
    if str(name_or_path).startswith(("package:", "hub:")):  # a weights spec (medclipin.models.weights)
        from medclipin.models.weights import WeightsError, parse_weights

        try:
            name_or_path = parse_weights(str(name_or_path), "text").location
        except WeightsError as exc:
            raise TokenizerError(f"tokenizer: {exc}") from None
    path = Path(os.path.expanduser(str(name_or_path)))
    if not path.exists() and not _looks_like_hub_id(str(name_or_path)):
        raise TokenizerError(f"tokenizer folder not found: {name_or_path}")
    if path.is_dir() and not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                "vocab.txt", "spiece.model")):
        raise TokenizerError(f"{name_or_path}: folder holds no tokenizer files (expected tokenizer.json "
                             "from save_pretrained; train one with `medclipin tokenizer train`)")
    if truncation_side not in (None, "left", "right"):
        raise TokenizerError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.exists() else str(name_or_path),
                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        where = "local folder" if path.exists() else "hub name"
        hint = ("; running offline (HF_HUB_OFFLINE) and it is not in the local cache -- pass a local "
                "save_pretrained folder instead" if _offline() and not path.exists() else "")
        raise TokenizerError(f"cannot load tokenizer from {where} {name_or_path!r}{hint}: {exc}") from exc
    if truncation_side is not None:
        tokenizer.truncation_side = truncation_side
    return tokenizer


def _looks_like_hub_id(name: str) -> bool:
    # "bert-base-uncased" or "org/name": at most one slash, no leading "." "/" "~", no backslash
    parts = name.split("/")
    return len(parts) <= 2 and all(parts) and not name.startswith((".", "/", "~")) and "\\" not in name


def train_wordpiece_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir=None,
    lowercase: bool = True,
    min_frequency: int = 2,
    model_max_length: int = 512,
):
    """Train a BERT-style WordPiece tokenizer; save it to ``out_dir`` when one is given.

    Special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4); encodings are
    ``[CLS] text [SEP]`` (pairs ``[CLS] a [SEP] b [SEP]``). Saved with ``save_pretrained`` so
    ``AutoTokenizer.from_pretrained(out_dir)`` (and :func:`load_tokenizer`) loads it; the folder is
    assembled beside ``out_dir`` and renamed into place, so a kill never leaves half a tokenizer.

    Deterministic: the same texts give the same vocabulary with the same ids, byte for byte, in any
    process. The ``tokenizers`` trainer is not (it numbers ``##`` sub-words in hash-map order, which
    changes every process, and breaks ties between equally frequent merges by those numbers, so even
    the token *set* varied), so the vocabulary is learned here (:func:`learn_wordpiece_vocab`) by the
    same algorithm with every tie broken by the strings themselves.

    Returns:
        the ``PreTrainedTokenizerFast``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 10:
        raise TokenizerError(f"vocab_size {vocab_size} is too small (needs room for the special tokens)")
    specials = list(SPECIAL_TOKENS.values())
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                            lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    count = 0
    for text in texts:
        if text and text.strip():
            count += 1
            words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    if count == 0:
        raise TokenizerError("no non-empty texts to train the tokenizer on")
    vocab = learn_wordpiece_vocab(words, vocab_size, min_frequency=min_frequency, specials=specials)
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix=CONTINUATION,
                                           max_input_chars_per_word=100))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer.decoder = decoders.WordPiece(prefix=CONTINUATION)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=model_max_length,
                                   **SPECIAL_TOKENS)
    if out_dir is not None:
        save_tokenizer(fast, out_dir)
    return fast


def save_tokenizer(tokenizer, out_dir) -> Path:
    """``tokenizer.save_pretrained`` into a staging folder beside ``out_dir``, then one rename."""
    from medclipin.atomic import replace_directory

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        tokenizer.save_pretrained(str(staging))
        replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def learn_wordpiece_vocab(word_counts: Mapping[str, int], vocab_size: int, min_frequency: int = 2,
                          specials: Sequence[str] = (), prefix: str = CONTINUATION) -> dict[str, int]:
    """A WordPiece vocabulary (token → id) learned from word counts, deterministically.

    The algorithm of the ``tokenizers`` WordPiece trainer: start from the special tokens, every
    character of the corpus and every character as a continuation (``##c``), then repeatedly merge the
    most frequent pair of adjacent symbols inside words (``a`` + ``##b`` → ``ab``) until the vocabulary
    holds ``vocab_size`` tokens or no pair occurs ``min_frequency`` times. Equally frequent pairs are
    merged in the order of their strings, and ids are given in that order, so the result depends on the
    counts alone.
    """
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for token in specials:
        add(token)
    words = sorted(word for word, n in word_counts.items() if word and n > 0)
    counts = [int(word_counts[word]) for word in words]
    for char in sorted({char for word in words for char in word}):
        add(char)
    symbols = [[word[0], *(prefix + char for char in word[1:])] for word in words]
    for token in sorted({token for word in symbols for token in word[1:]}):
        add(token)

    pair_counts: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for index, word in enumerate(symbols):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += counts[index]
            where[pair].add(index)
    # max-heap on count, ties by the pair's strings; entries go stale as counts change and are re-checked
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)
    threshold = max(int(min_frequency), 1)
    while len(vocab) < vocab_size and heap:
        negative, pair = heapq.heappop(heap)
        current = pair_counts.get(pair, 0)
        if -negative != current:
            if current > 0:
                heapq.heappush(heap, (-current, pair))
            continue
        if current < threshold:
            break
        first, second = pair
        merged = first + (second[len(prefix):] if second.startswith(prefix) else second)
        add(merged)
        changed: dict[tuple[str, str], int] = defaultdict(int)
        for index in sorted(where.pop(pair, ())):
            word = symbols[index]
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            if len(out) == len(word):
                continue
            for old in zip(word, word[1:]):
                changed[old] -= counts[index]
            for new in zip(out, out[1:]):
                changed[new] += counts[index]
                where[new].add(index)
            symbols[index] = out
        for changed_pair, delta in sorted(changed.items()):
            if delta:
                pair_counts[changed_pair] += delta
                if delta > 0:
                    heapq.heappush(heap, (-pair_counts[changed_pair], changed_pair))
        pair_counts.pop(pair, None)
    return vocab
