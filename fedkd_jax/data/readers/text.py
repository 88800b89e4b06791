"""Character and word vocabularies of the standard text tasks, and the next-token
sequences built from them (targets ``-1`` at padding).

- LEAF Shakespeare: LEAF's 80-character ``ALL_LETTERS`` (its
  ``models/utils/language_utils.py``); id = position in that string, and one
  more id, 80, for any other character (LEAF itself maps those to -1).
- TFF Shakespeare: TFF's 86-character ``CHAR_VOCAB`` (its
  ``simulation/baselines/shakespeare/char_prediction_preprocessing.py``):
  pad 0, characters 1..86, out-of-vocabulary 87, beginning 88, end 89.
- Stack Overflow: the ``vocab_size`` most frequent words of the training
  clients, then pad 0, words 1..V, out-of-vocabulary V+1, beginning V+2, end V+3
  (TFF's ``word_prediction_preprocessing.py``, as Reddi et al. 2021 use it).
"""

from __future__ import annotations

import collections
from typing import Iterable

import numpy as np

LEAF_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
LEAF_OOV = len(LEAF_LETTERS)  # 80
LEAF_SEQ_LEN = 80

TFF_CHARS = "dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r"
TFF_CHAR_TOKENS = {"pad": 0, "oov": len(TFF_CHARS) + 1, "bos": len(TFF_CHARS) + 2, "eos": len(TFF_CHARS) + 3}

_LEAF_TABLE = np.full(256, LEAF_OOV, np.int32)
_LEAF_TABLE[np.frombuffer(LEAF_LETTERS.encode("ascii"), np.uint8)] = np.arange(len(LEAF_LETTERS))
_TFF_TABLE = np.full(256, TFF_CHAR_TOKENS["oov"], np.int32)
_TFF_TABLE[np.frombuffer(TFF_CHARS.encode("ascii"), np.uint8)] = np.arange(1, len(TFF_CHARS) + 1)


def _char_codes(text: str) -> np.ndarray:
    """One code per character (LEAF works on characters); codes above 255 become
    255, outside both vocabularies."""
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), np.uint8)
    return np.fromiter((min(ord(c), 255) for c in text), np.uint8, len(text))


def _byte_codes(text: bytes | str) -> np.ndarray:
    """One code per UTF-8 byte (TFF splits snippets with ``tf.strings.bytes_split``)."""
    return np.frombuffer(text.encode("utf-8") if isinstance(text, str) else bytes(text), np.uint8)


def leaf_char_ids(text: str) -> np.ndarray:
    return _LEAF_TABLE[_char_codes(text)]


def leaf_shakespeare_rows(xs: list, ys: list) -> tuple[np.ndarray, np.ndarray]:
    """LEAF rows (an 80-character window, the next character) as next-character
    sequences: input ids of the window, targets the window shifted by one plus the
    next character. A shorter window is padded (input id 80, target -1)."""
    n, L = len(xs), LEAF_SEQ_LEN
    x = np.full((n, L), LEAF_OOV, np.int32)
    y = np.full((n, L), -1, np.int32)
    for i, (window, nxt) in enumerate(zip(xs, ys)):
        ids = np.concatenate([leaf_char_ids(window), leaf_char_ids(nxt)[:1]])[-(L + 1):]
        k = len(ids) - 1
        x[i, :k], y[i, :k] = ids[:-1], ids[1:]
    return x, y


def tff_char_rows(snippets: Iterable[bytes | str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """TFF's Shakespeare preprocessing: each snippet becomes ``[bos] chars [eos]``,
    padded with 0 to a multiple of ``seq_len + 1`` and cut into pieces; inputs are a
    piece without its last id, targets without its first (-1 where the target is padding)."""
    t = TFF_CHAR_TOKENS
    pieces = []
    for s in snippets:
        ids = np.concatenate([[t["bos"]], _TFF_TABLE[_byte_codes(s)], [t["eos"]]])
        pad = (-len(ids)) % (seq_len + 1)
        pieces.append(np.concatenate([ids, np.zeros(pad, np.int64)]).reshape(-1, seq_len + 1))
    if not pieces:
        return np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.int32)
    seq = np.concatenate(pieces).astype(np.int32)
    x, y = seq[:, :-1], seq[:, 1:].copy()
    y[y == t["pad"]] = -1
    return x, y


def _words(sentence: bytes | str) -> list[str]:
    if isinstance(sentence, bytes):
        sentence = sentence.decode("utf-8", errors="replace")
    return sentence.split()


def build_vocab(clients: Iterable[Iterable[bytes | str]], size: int) -> list[str]:
    """The ``size`` words used by the most training clients (the count TFF's Stack
    Overflow word list holds), ties broken by total occurrences, then alphabetically."""
    users: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    for sentences in clients:
        seen: set[str] = set()
        for s in sentences:
            w = _words(s)
            total.update(w)
            seen.update(w)
        users.update(seen)
    ranked = sorted(users, key=lambda w: (-users[w], -total[w], w))
    return ranked[:size]


def word_tokens(vocab_size: int) -> dict[str, int]:
    return {"pad": 0, "oov": vocab_size + 1, "bos": vocab_size + 2, "eos": vocab_size + 3}


def word_rows(sentences: Iterable[bytes | str], vocab: dict[str, int], seq_len: int, vocab_size: int | None = None,
              ) -> tuple[np.ndarray, np.ndarray]:
    """TFF's Stack Overflow preprocessing, one row per sentence: ``[bos]`` + the first
    ``seq_len`` word ids (+ ``[eos]`` if the sentence was shorter), padded with 0 to
    ``seq_len + 1``; inputs drop the last id, targets the first (-1 at padding).
    The special ids follow ``vocab_size`` (default ``len(vocab)``)."""
    t = word_tokens(vocab_size or len(vocab))
    sentences = list(sentences)
    seq = np.zeros((len(sentences), seq_len + 1), np.int32)
    for i, s in enumerate(sentences):
        w = _words(s)[:seq_len]
        ids = [t["bos"]] + [vocab.get(v, t["oov"]) for v in w] + ([t["eos"]] if len(w) < seq_len else [])
        seq[i, :len(ids)] = ids
    x, y = seq[:, :-1], seq[:, 1:].copy()
    y[y == t["pad"]] = -1
    return x, y


def bag_of_words(texts: Iterable[str], vocab: dict[str, int]) -> np.ndarray:
    """``[n, V]`` word counts over ``vocab`` (ids 1..V; other words are not counted)."""
    texts = list(texts)
    out = np.zeros((len(texts), len(vocab)), np.float32)
    for i, t in enumerate(texts):
        for w in _words(t):
            j = vocab.get(w)
            if j is not None:
                out[i, j - 1] += 1.0
    return out
