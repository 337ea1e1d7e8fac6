"""CLIP's byte-level BPE as a Hugging Face fast tokenizer, built offline from the vocabulary open_clip ships.

open_clip's ``SimpleTokenizer`` holds OpenAI's 49,408-token BPE (``bpe_simple_vocab_16e6.txt.gz``). The same
vocabulary and merges in a ``CLIPTokenizerFast`` give the same ids for every real token (start, text, end;
truncated to the context with the end-of-text token kept last), plus what the processor needs and
``SimpleTokenizer`` lacks: padding to the batch's longest text, attention masks and word ids (text-side
Grad-CAM). Padding uses ``<|endoftext|>`` as Hugging Face's CLIP does; a causal tower pools at the first
end-of-text token, so padding never changes an embedding.
"""

from __future__ import annotations

import copy
import functools

START, END = "<|startoftext|>", "<|endoftext|>"


@functools.lru_cache(maxsize=1)
def _clip_bpe():
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizerFast

    simple = SimpleTokenizer()
    vocab = dict(simple.encoder)
    vocab[START] = vocab.pop("<start_of_text>")
    vocab[END] = vocab.pop("<end_of_text>")
    merges = [tuple(pair) for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda item: item[1])]
    return CLIPTokenizerFast(vocab=vocab, merges=merges, model_max_length=simple.context_length)


def clip_bpe_tokenizer(context_length: int = 77):
    """A fresh ``CLIPTokenizerFast`` with OpenAI CLIP's vocabulary (ids equal open_clip's ``SimpleTokenizer``)."""
    tokenizer = copy.deepcopy(_clip_bpe())
    tokenizer.model_max_length = int(context_length)
    return tokenizer
