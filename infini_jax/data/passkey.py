"""Passkey retrieval (Infini-attention paper, section 4.2; the Landmark-attention prompt).

Prompt text (units joined by single spaces)::

    INTRO FILLER FILLER ... KEY_LINE FILLER ... FILLER QUESTION

with INTRO, FILLER, KEY_LINE, QUESTION below, ``n_filler`` filler repetitions, and the key line inserted after
``round(depth * n_filler)`` fillers (depth 0 = right after the intro, 1 = right before the question).
The target is ANSWER = " <passkey>" (a leading space then the digits).

Token semantics (exact): every unit is encoded once and the pieces are concatenated, so the prompt of
``n_filler`` fillers has ``fixed + n_filler * len(filler_ids)`` tokens and a 1M-token prompt is cheap to stream.
For bytes this is exactly ``encode(prompt_text)``; for SentencePiece, whose dummy prefix supplies the space
before every unit, it equals encoding the joined text up to SentencePiece's whitespace handling.
``intro=False`` drops the intro (for short training windows; the first unit then keeps its leading space).
``length`` means the total of [bos] + prompt + answer tokens; the builder uses the largest ``n_filler`` whose
total is <= length, so the total is in (length - len(filler_ids), length].

Book-text haystack (``Haystack``): the filler is replaced by a contiguous span of real prose from the .txt files
of a folder (seeded start, starting at a word), and the key line is inserted at the word start nearest to
``depth`` of the way through it. The intro, key line, question and answer are the paper's. The total is then
exactly ``length``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from infini_jax.data.haystack import Haystack, insert_number, word_starts

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_TEMPLATE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def random_passkey(rng: np.random.Generator, n_digits: int = 5) -> str:
    """A random n-digit passkey without a leading zero."""
    first = str(int(rng.integers(1, 10)))
    return first + "".join(str(int(d)) for d in rng.integers(0, 10, size=n_digits - 1))


def insert_index(n_filler: int, depth: float) -> int:
    """How many fillers precede the key line."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth must be in [0, 1], got {depth}")
    return int(min(n_filler, max(0, round(depth * n_filler))))


def passkey_text(n_filler: int, depth: float, passkey: str) -> tuple[str, str]:
    """(prompt_text, answer_text) as plain strings (for display and for checking the exact wording)."""
    k = insert_index(n_filler, depth)
    units = [INTRO] + [FILLER] * k + [KEY_TEMPLATE.format(key=passkey)] + [FILLER] * (n_filler - k) + [QUESTION]
    return " ".join(units), " " + passkey


def _last_occurrence(ids_T: np.ndarray, sub_A: np.ndarray) -> int:
    """Index of the last occurrence of sub_A in ids_T (the key line holds the answer's tokens twice)."""
    if len(ids_T) >= len(sub_A):
        hits = np.flatnonzero((np.lib.stride_tricks.sliding_window_view(ids_T, len(sub_A)) == sub_A).all(1))
        if len(hits):
            return int(hits[-1])
    raise ValueError("the key line does not hold the answer's tokens: passkey_loss_on_key needs a tokenizer that "
                     "encodes ' <key>' the same inside the key line")


def _unit_ids(tokenizer, text: str, first: bool) -> np.ndarray:
    if not first and not getattr(tokenizer, "space_prefix", False):
        text = " " + text
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


@dataclasses.dataclass
class _Layout:
    bos_N: np.ndarray
    intro_N: np.ndarray
    filler_N: np.ndarray
    key_N: np.ndarray
    question_N: np.ndarray
    answer_N: np.ndarray

    @classmethod
    def make(cls, tokenizer, passkey: str, add_bos: bool, intro: bool = True, prose: bool = False) -> "_Layout":
        return cls(
            bos_N=np.asarray([tokenizer.bos_id] if add_bos else [], dtype=np.int32),
            intro_N=_unit_ids(tokenizer, INTRO, True) if intro else np.zeros(0, np.int32),
            filler_N=_unit_ids(tokenizer, FILLER, False),
            # in prose the key line sits between words: the whitespace before it is the prose's, after it ours
            key_N=_unit_ids(tokenizer, KEY_TEMPLATE.format(key=passkey)
                            + (" " if prose and not getattr(tokenizer, "space_prefix", False) else ""), prose),
            question_N=_unit_ids(tokenizer, QUESTION, False),
            answer_N=_unit_ids(tokenizer, passkey, False),
        )

    @property
    def fixed_len(self) -> int:
        return sum(len(a) for a in (self.bos_N, self.intro_N, self.key_N, self.question_N, self.answer_N))

    def n_filler_for(self, length: int) -> int:
        if length < self.fixed_len:
            raise ValueError(f"passkey length {length} is shorter than the prompt without filler ({self.fixed_len})")
        return (length - self.fixed_len) // len(self.filler_N)


class PasskeyStream:
    """A passkey prompt of ~``length`` tokens, produced chunk by chunk (bounded memory, any length).

    Attributes known before streaming: ``total_len`` (tokens yielded, including the answer when
    include_answer), ``prompt_len`` (= answer_start), ``answer_ids``, ``key_start`` / ``key_len`` (the key
    line's first token and length), ``n_filler``, ``passkey``. Iterating yields int32 arrays of at most
    ``chunk_tokens`` tokens. With a ``haystack`` (a `Haystack`), prose replaces the filler (``n_filler`` = 0).
    For teacher-forced token accuracy, the model's predictions at positions answer_start-1 ...
    answer_start+len(answer_ids)-2 must equal answer_ids.
    """

    def __init__(self, tokenizer, length: int, depth: float = 0.5, *, passkey: str | None = None, seed: int = 0,
                 n_digits: int = 5, chunk_tokens: int = 65536, add_bos: bool = True, include_answer: bool = True,
                 intro: bool = True, haystack: Haystack | None = None):
        rng = np.random.default_rng(seed)
        if passkey is None:
            passkey = random_passkey(rng, n_digits)
        self.passkey = passkey
        self.chunk_tokens = int(chunk_tokens)
        self.include_answer = include_answer
        self._lay = lay = _Layout.make(tokenizer, passkey, add_bos, intro, prose=haystack is not None)
        if haystack is None:
            self._prose = None
            self.n_filler = lay.n_filler_for(length)
            self.n_before = insert_index(self.n_filler, depth)
            self.key_start = len(lay.bos_N) + len(lay.intro_N) + self.n_before * len(lay.filler_N)
            body_len = self.n_filler * len(lay.filler_N)
        else:
            lay.n_filler_for(length)  # the same "too short" error
            self._prose = haystack.span(length - lay.fixed_len, rng)
            self.n_filler, self.n_before = 0, haystack.insert_at(
                self._prose, insert_index(len(self._prose), depth), tokenizer)
            self.key_start = len(lay.bos_N) + len(lay.intro_N) + self.n_before
            body_len = len(self._prose)
        self.key_len = len(lay.key_N)
        self.prompt_len = lay.fixed_len - len(lay.answer_N) + body_len
        self.answer_start = self.prompt_len
        self.answer_ids = lay.answer_N.copy()
        self.total_len = self.prompt_len + (len(lay.answer_N) if include_answer else 0)

    def _units(self) -> Iterator[np.ndarray]:
        lay = self._lay
        yield lay.bos_N
        yield lay.intro_N
        if self._prose is not None:
            yield self._prose[:self.n_before]
            yield lay.key_N
            yield self._prose[self.n_before:]
        else:
            for _ in range(self.n_before):
                yield lay.filler_N
            yield lay.key_N
            for _ in range(self.n_filler - self.n_before):
                yield lay.filler_N
        yield lay.question_N
        if self.include_answer:
            yield lay.answer_N

    def __iter__(self) -> Iterator[np.ndarray]:
        buf_C = np.empty(self.chunk_tokens, dtype=np.int32)
        fill = 0
        for unit_N in self._units():
            pos = 0
            while pos < len(unit_N):
                take = min(len(unit_N) - pos, self.chunk_tokens - fill)
                buf_C[fill:fill + take] = unit_N[pos:pos + take]
                fill += take
                pos += take
                if fill == self.chunk_tokens:
                    yield buf_C.copy()
                    fill = 0
        if fill:
            yield buf_C[:fill].copy()


@dataclasses.dataclass
class PasskeyExample:
    tokens: np.ndarray      # int32 [total_len]: [bos] + prompt + answer
    prompt_len: int         # = answer_start
    answer_ids: np.ndarray  # int32 [A]
    key_start: int          # token index of the key line
    key_len: int            # tokens of the key line
    n_filler: int
    passkey: str

    @property
    def answer_start(self) -> int:
        return self.prompt_len


def make_passkey_example(tokenizer, length: int, depth: float = 0.5, *, seed: int = 0, passkey: str | None = None,
                         n_digits: int = 5, add_bos: bool = True, intro: bool = True,
                         haystack: Haystack | None = None) -> PasskeyExample:
    """One whole example (prompt + answer) with total tokens in (length - len(filler), length]."""
    stream = PasskeyStream(tokenizer, length, depth, passkey=passkey, seed=seed, n_digits=n_digits,
                           chunk_tokens=max(1, length), add_bos=add_bos, include_answer=True, intro=intro,
                           haystack=haystack)
    tokens_T = np.concatenate(list(stream)) if stream.total_len else np.zeros(0, np.int32)
    return PasskeyExample(tokens_T, stream.prompt_len, stream.answer_ids, stream.key_start, stream.key_len,
                          stream.n_filler, stream.passkey)


class PasskeyIterator:
    """Batches of passkey examples in the contract's format, right-padded.

    Each row is one example of total length drawn uniformly from [min_len, seq_len + 1] (seq_len + 1 tokens
    give seq_len inputs and seq_len shifted targets), placed at position 0 and right-padded with pad_id, so the
    layout is the evaluation's (prompt from the start, nothing attended or written before it). loss_mask is 1
    on the answer targets only (or on every non-pad target when loss_on_all). reset is True on every row.
    Examples are a pure function of (seed, process_index, batch number), so get_state() is just the counter.
    With num_batches set the iterator is finite (evaluation), otherwise infinite.

    intro: True/False, or the probability that an example starts with the paper's intro sentence.
    loss_on_key: also score the key line's second copy of the passkey ("Remember it. <key> is the pass key"),
    predicted from its first copy: whenever the two copies fall in different segments (most of the time for
    segments shorter than the key line), that is a retrieval through the memory too, so each example teaches it
    up to twice. The evaluation's prompts and scoring are unchanged.
    shift (a probability), from batch `shift_after` on: put a random tail of the filler (cut at a word start,
    possibly empty) in front of the first filler or the key line, so that over training the key line falls at
    every offset within a segment. Without it, whole units put the key line at only a few offsets, and prompts of
    other lengths (the evaluation's) at others.
    Memory-mass augmentation (mass_prob > 0, needs segment_len): from batch `mass_after` on (a curriculum: the
    retrieval is learnt first on plain memories), in a random mass_prob share of the rows, the
    memory writes of every segment that holds no token of the key line are scaled by one c ~ log-uniform
    [1, mass_max] per row, emitted as batch["write_scale"] [B, seq_len / segment_len] (the model multiplies
    σ(K)ᵀV and Σσ(K) by it). For the linear rule this is exactly the memory that segment would leave had it
    been seen c times: a much longer haystack at no extra compute.
    distractors (a mean count, with a haystack), from batch `distractors_after` on: a Poisson number of random
    numbers (1 to n_digits + 1 digits) put before random words of the row's prose, at least one word away from
    the key line (haystack.insert_number). Real prose holds numbers of its own, hundreds in 2^20 tokens; these
    teach the reads to pick the key line's number, not any number. Scaled rows repeat them c times.
    """

    def __init__(self, tokenizer, *, seq_len: int, batch_size: int, seed: int = 0, process_index: int = 0,
                 n_digits: int = 5, min_len: int | None = None, depth_min: float = 0.0, depth_max: float = 1.0,
                 loss_on_all: bool = False, num_batches: int | None = None, intro: bool = True,
                 haystack: Haystack | None = None, segment_len: int | None = None, mass_prob: float = 0.0,
                 mass_max: float = 128.0, mass_after: int = 0, loss_on_key: bool = False, shift: float = 0.0,
                 shift_after: int = 0, distractors: float = 0.0, distractors_after: int = 0):
        self.tok = tokenizer
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.seed, self.process_index = int(seed), int(process_index)
        self.n_digits, self.loss_on_all, self.loss_on_key = int(n_digits), bool(loss_on_all), bool(loss_on_key)
        self.max_len = self.seq_len + 1
        self.min_len = self.max_len if min_len is None else int(min(min_len, self.max_len))
        self.depth_min, self.depth_max = float(depth_min), float(depth_max)
        self.num_batches, self.intro, self.haystack = num_batches, float(intro), haystack
        self.mass_prob, self.mass_max, self.mass_after = float(mass_prob), float(mass_max), int(mass_after)
        self.segment_len = None if segment_len is None else int(segment_len)
        self.shift, self.shift_after = float(shift), int(shift_after)
        if not 0.0 <= self.shift <= 1.0:
            raise ValueError(f"passkey_shift must be a bool or a probability in [0, 1], got {shift}")
        if self.shift and haystack is not None:  # the tail is the paper's filler, which prose examples do not have
            raise ValueError("passkey_shift inserts the paper's filler, but passkey_haystack hides the key line in "
                             "prose (already at any offset): set passkey_shift=0 with a haystack")
        self.distractors, self.distractors_after = float(distractors), int(distractors_after)
        if not self.distractors >= 0.0:
            raise ValueError(f"passkey_distractors must be a mean count >= 0, got {distractors}")
        if self.distractors and haystack is None:
            raise ValueError("passkey_distractors hides random numbers in book prose, but there is none (the paper's "
                             "filler holds no numbers): set passkey_haystack=DIR or passkey_distractors=0")
        self._intro_len = len(_unit_ids(tokenizer, INTRO, True))  # the shift and the distractors: where prose starts
        self._question_len = len(_unit_ids(tokenizer, QUESTION, False))
        if self.shift:  # the filler's tails at word starts, each with the whitespace before it (none first)
            filler_N = _unit_ids(tokenizer, FILLER, False)
            lead = 0 if getattr(tokenizer, "space_prefix", False) else 1
            starts = [int(i) - lead for i in np.flatnonzero(word_starts(tokenizer, filler_N))]
            self._tails = [filler_N[i:] for i in starts if i >= 0] + [filler_N[:0]]  # as every unit after the first
        self.step = 0
        if not 0.0 <= self.intro <= 1.0:
            raise ValueError(f"passkey_intro must be a bool or a probability in [0, 1], got {intro}")
        if not 0.0 <= self.mass_prob <= 1.0 or self.mass_max < 1.0:
            raise ValueError(f"passkey_mass_prob must be in [0, 1] and passkey_mass_max >= 1, got "
                             f"{self.mass_prob} and {self.mass_max}")
        if self.mass_prob > 0 and (not self.segment_len or self.seq_len % self.segment_len):
            raise ValueError(f"memory-mass augmentation needs the model's segment_len dividing seq_len "
                             f"{self.seq_len}, got segment_len={segment_len}")
        self._shortest = {i: _Layout.make(tokenizer, "9" * self.n_digits, True, i).fixed_len for i in (False, True)}
        shortest = self._shortest[self.intro == 1.0]
        if self.min_len < shortest or (self.intro > 0 and self._shortest[True] > self.max_len):
            need = self._shortest[self.intro > 0]
            raise ValueError(f"passkey min_len/seq_len too small: the prompt without filler needs {need} tokens, "
                             f"got min_len {self.min_len}, seq_len {self.seq_len}; raise them (or passkey_intro=False)")

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_batches is not None and self.step >= self.num_batches:
            raise StopIteration
        rng = np.random.default_rng([self.seed, self.process_index, self.step])
        B, L = self.batch_size, self.seq_len
        seq_BL1 = np.full((B, L + 1), self.tok.pad_id, dtype=np.int32)
        score_BL1 = np.zeros((B, L + 1), dtype=np.float32)  # weight of each position *as a target*
        scale_BS = np.ones((B, L // self.segment_len if self.mass_prob > 0 else 0), np.float32)
        for b in range(B):
            length = int(rng.integers(self.min_len, self.max_len + 1))
            depth = float(rng.uniform(self.depth_min, self.depth_max))
            intro = bool(rng.random() < self.intro) if 0.0 < self.intro < 1.0 else self.intro == 1.0
            numbers = ([self._distractor(rng) for _ in range(rng.poisson(self.distractors))]
                       if self.distractors and self.step >= self.distractors_after else [])
            while sum(len(n_N) for n_N in numbers) > max(0, length - self._shortest[intro]):
                numbers.pop()  # no room left in this row for them all
            room = sum(len(n_N) for n_N in numbers)
            ex = make_passkey_example(self.tok, max(length - room, self._shortest[intro]), depth, intro=intro,
                                      passkey=random_passkey(rng, self.n_digits), haystack=self.haystack,
                                      seed=int(rng.integers(2**31)))
            for number_N in numbers:
                ex = self._distracted(ex, number_N, rng, intro)
            if self.shift and self.step >= self.shift_after and rng.random() < self.shift:
                ex = self._shifted(ex, rng, intro)
            n = len(ex.tokens)
            seq_BL1[b, :n] = ex.tokens
            score_BL1[b, 1 if self.loss_on_all else ex.answer_start:n] = 1.0
            if self.loss_on_key:
                second = ex.key_start + _last_occurrence(ex.tokens[ex.key_start:ex.key_start + ex.key_len],
                                                         ex.answer_ids)
                score_BL1[b, second:second + len(ex.answer_ids)] = 1.0
            if self.mass_prob > 0 and rng.random() < self.mass_prob and self.step >= self.mass_after:
                c = float(np.exp(rng.uniform(0.0, np.log(self.mass_max))))
                first, last = ex.key_start // self.segment_len, (ex.key_start + ex.key_len - 1) // self.segment_len
                scale_BS[b] = c
                scale_BS[b, first:last + 1] = 1.0
        self.step += 1
        batch = {
            "tokens": np.ascontiguousarray(seq_BL1[:, :-1]),
            "targets": np.ascontiguousarray(seq_BL1[:, 1:]),
            "loss_mask": np.ascontiguousarray(score_BL1[:, 1:]),
            "reset": np.ones((B,), dtype=bool),
        }
        if self.mass_prob > 0:
            batch["write_scale"] = scale_BS
        return batch

    def _distractor(self, rng: np.random.Generator) -> np.ndarray:
        """A random number of 1 to n_digits + 1 digits, with the whitespace in front of it."""
        return _unit_ids(self.tok, random_passkey(rng, int(rng.integers(1, self.n_digits + 2))), False)

    def _distracted(self, ex: PasskeyExample, number_N: np.ndarray, rng: np.random.Generator,
                    intro: bool) -> PasskeyExample:
        """ex with number_N before a random word of its prose, at least one word away from the key line."""
        i_T = np.arange(len(ex.tokens))
        head = 1 + (self._intro_len if intro else 0)  # [bos] and the intro
        key_end, question = ex.key_start + ex.key_len, ex.prompt_len - self._question_len
        allowed_T = word_starts(self.tok, ex.tokens) & (
            ((i_T > head) & (i_T < ex.key_start)) | ((i_T > key_end) & (i_T < question)))
        tokens_T, at = insert_number(ex.tokens, allowed_T, number_N, self.haystack.lead, rng)
        if at < 0:
            return ex
        n = len(number_N)
        return dataclasses.replace(ex, tokens=tokens_T, prompt_len=ex.prompt_len + n,
                                   key_start=ex.key_start + (n if at < ex.key_start else 0))

    def _shifted(self, ex: PasskeyExample, rng: np.random.Generator, intro: bool) -> PasskeyExample:
        """ex with a random filler tail that still fits the row inserted after the intro (before the first
        filler or the key line)."""
        room = self.max_len - len(ex.tokens)
        tails = [t for t in self._tails if len(t) <= room]
        tail_N = tails[int(rng.integers(len(tails)))]
        at = 1 + (self._intro_len if intro else 0)
        tokens_T = np.concatenate([ex.tokens[:at], tail_N, ex.tokens[at:]])
        n = len(tail_N)
        return dataclasses.replace(ex, tokens=tokens_T, prompt_len=ex.prompt_len + n, key_start=ex.key_start + n)

    def get_state(self) -> dict:
        return {"kind": "passkey", "step": self.step, "seed": self.seed, "process_index": self.process_index}

    def set_state(self, state: dict) -> None:
        if state.get("kind") != "passkey":
            raise ValueError(f"not a passkey iterator state: {state}")
        self.step = int(state["step"])
