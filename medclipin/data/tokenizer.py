"""Tokenizers: load any Hugging Face tokenizer (hub name or local folder), or train a domain WordPiece.

Trained tokenizers are built with the ``tokenizers`` library and wrapped in
``PreTrainedTokenizerFast`` -- in transformers 5.x ``BertTokenizer(vocab_file=...)`` silently ignores
the vocabulary file, and ``AutoTokenizer`` cannot load a folder that holds only ``vocab.txt``. The
saved folder (``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``) loads
with ``AutoTokenizer.from_pretrained(out_dir)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from medclipin.errors import MedclipinError

__all__ = ["TokenizerError", "load_tokenizer", "train_wordpiece_tokenizer", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}


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
    out_dir,
    lowercase: bool = True,
    min_frequency: int = 2,
    model_max_length: int = 512,
):
    """Train a BERT-style WordPiece tokenizer and save it to ``out_dir``.

    Special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4); encodings are
    ``[CLS] text [SEP]`` (pairs ``[CLS] a [SEP] b [SEP]``). Saved with ``save_pretrained`` so
    ``AutoTokenizer.from_pretrained(out_dir)`` (and :func:`load_tokenizer`) loads it.

    Returns:
        the ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 10:
        raise TokenizerError(f"vocab_size {vocab_size} is too small (needs room for the special tokens)")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                      strip_accents=None, lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=specials, continuing_subword_prefix="##",
                                        show_progress=False)
    count = 0

    def iterate():
        nonlocal count
        for text in texts:
            if text and text.strip():
                count += 1
                yield text

    tokenizer.train_from_iterator(iterate(), trainer=trainer)
    if count == 0:
        raise TokenizerError("no non-empty texts to train the tokenizer on")
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=model_max_length,
                                   **SPECIAL_TOKENS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast
