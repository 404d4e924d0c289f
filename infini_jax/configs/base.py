"""Every config key and its default: each experiment config starts from this one and overrides what differs.

The code reads its defaults from here (infini_jax.config.defaults), so a key that is not here is an error
everywhere, and every key here can be set with `--config.<section>.<key>=value`. Keys that may be None are
`placeholder(type)`: `--config.model.num_kv_heads=2` works and is type-checked. The model section is the
fields of infini_jax.model.ModelConfig (documented there). The comment after each key is its row in the
README's table (`python -m infini_jax.config --markdown`); keep it to one line.
"""

import dataclasses
import typing

import ml_collections
from ml_collections.config_dict import FieldReference

from infini_jax.config import parse_arg
from infini_jax.model import ModelConfig


def _model_section() -> dict:
    """ModelConfig's fields and defaults; Optional[T] fields become FieldReferences of T that may be None."""
    hints = typing.get_type_hints(ModelConfig)
    out = {}
    for f in dataclasses.fields(ModelConfig):
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
        out[f.name] = FieldReference(f.default, field_type=args[0]) if args else f.default
    return out


def get_config(arg=None):
    parse_arg(arg, {})  # the base takes no args
    placeholder = ml_collections.config_dict.placeholder
    config = ml_collections.ConfigDict()
    config.model = _model_section()
    config.data = dict(
        name="passkey",  # source: 'passkey' (generated), 'text' (a folder), 'pg19' (TFDS build), 'booksum' (JSONL)
        tokenizer="byte",  # 'byte', a SentencePiece .model, or a Hugging Face tokenizer dir / tokenizer.json
        seed=0,  # document shuffling / passkey sampling (eval uses seed + 1_000_003)
        data_dir="",  # text: folder (train/validation/test or flat); pg19: TFDS data_dir; booksum: .jsonl or folder
        num_batches=placeholder(int),  # eval: exactly this many batches (pads after the data ends; set for multi-host)
        eval_batches=4,  # passkey eval batches when num_batches is unset (train.py sets it to train.eval_batches)
        prefetch=2,  # train: batches prepared ahead on a background thread (Grain's); 0: on the training thread
        passkey_digits=5,  # passkey: digits of the pass key
        passkey_min_len=placeholder(int),  # passkey: example lengths drawn from [min_len, seq_len+1]; None: seq_len+1
        passkey_depth_min=0.0,  # passkey: shallowest relative depth of the key line
        passkey_depth_max=1.0,  # passkey: deepest relative depth of the key line
        passkey_loss_on_all=False,  # passkey: loss on every non-pad token, not only the answer
        passkey_loss_on_key=False,  # passkey (train): also score the key line's second copy of the key (a retrieval from its first)
        passkey_shift=0.0,  # passkey (train): share of rows with a random filler tail before the key line (every offset in a segment)
        passkey_shift_after=0,  # passkey: the training batch from which the shift starts
        passkey_distractors=0.0,  # passkey (train, haystack): mean count (Poisson) of random numbers hidden in a row's prose
        passkey_distractors_after=0,  # passkey: the training batch from which the distractors start
        passkey_intro=1.0,  # passkey: probability that an example has the paper's intro sentence (~150 tokens)
        passkey_haystack="",  # passkey: folder of .txt books whose prose replaces the filler (or its split subfolder)
        passkey_mass_prob=0.0,  # passkey: share of training rows with memory-mass augmentation
        passkey_mass_max=128.0,  # passkey: key-less segment writes count c ~ log-uniform[1, mass_max] times
        passkey_mass_after=0,  # passkey: the training batch from which the augmentation starts
        text_field="text",  # text: field of .jsonl records holding the text
        extensions=(".txt", ".tex", ".md", ".jsonl"),  # text: file suffixes read from data_dir
        document_field="document",  # booksum: field holding the book
        summary_field="summary",  # booksum: field holding its summary
        separator="\n\nSummary:\n",  # booksum: text between document and summary
        max_document_tokens=placeholder(int),  # booksum: cut documents to this many tokens; None: no cut
    )
    config.train = dict(
        steps=100,  # optimizer steps (the learning-rate schedule ends here)
        batch_size=8,  # global batch (rows of seq_len tokens), split over processes and the data/fsdp mesh axes
        seed=0,  # parameter init (and the train state's rng)
        log_every=10,  # steps between train metric lines in metrics.jsonl / tb
        eval_every=0,  # steps between evaluations on the validation split; 0: only at the end
        eval_batches=4,  # batches per evaluation
        ckpt_every=0,  # steps between checkpoints; 0: only at the end (and on SIGTERM)
        keep_checkpoints=2,  # checkpoints kept in <workdir>/checkpoints
        async_checkpoints=True,  # save in a background thread while training goes on
        init_from="",  # params that start a fresh run: a workdir / checkpoints dir / step dir, or hf:DIR (Llama, Gemma)
        allow_schedule_change=False,  # resume although steps/optim keys that shape the LR schedule changed
        cpu_devices=0,  # CPU-only hosts: JAX's CPU backend as this many devices, so the data axis uses the cores; 0: JAX's default (1)
        carry_memory=False,  # carry each row's memory from step to step with its document (truncated BPTT); False: every window starts empty
    )
    config.optim = dict(
        name="adamw",  # 'adamw' or 'adafactor'
        lr=1e-3,  # peak learning rate
        gate_lr=placeholder(float),  # learning rate of the gates β (no weight decay); None: = lr
        warmup_steps=0,  # linear warm-up from 0
        schedule="cosine",  # after warm-up: 'cosine' (to lr * min_lr_ratio at train.steps) or 'constant'
        min_lr_ratio=0.1,  # final lr / peak lr of the cosine schedule
        weight_decay=0.0,  # decoupled weight decay on matrices (not norm scales, not β)
        clip_norm=1.0,  # global gradient-norm clipping; 0: none
        grad_accum=1,  # microbatches per step (exact token weighting; batch_size must divide by it)
        b1=0.9,  # AdamW first-moment decay; Adafactor: first moment only if > 0
        b2=0.95,  # AdamW second-moment decay
        eps=1e-8,  # AdamW epsilon
        adafactor_decay_rate=0.8,  # Adafactor second-moment decay exponent (t^-0.8)
        adafactor_clip=1.0,  # Adafactor update clipping at this RMS; 0: none
        adafactor_param_scale=False,  # Adafactor: scale updates by the parameter RMS
    )
    config.mesh = dict(
        data=-1,  # data-parallel mesh axis size; -1: the devices left
        fsdp=1,  # fully sharded data-parallel axis (params and optimizer state sharded over it)
        context=placeholder(int),  # context parallelism: segments split over it (must divide n_segments); None: off
        tensor=1,  # tensor-parallel axis (heads and MLP width)
    )
    config.evals = dict(  # evaluators (infini_jax/evals): config.evals.<name> = dict(type=..., every=..., options)
        passkey=dict(
            type="passkey",  # the passkey sweep (evals/passkey_retrieval.py); run by train.py and eval.py
            every=0,  # training steps between sweeps (and at the end); 0: only at the end of training
            x=(),  # digit accuracy at these multiples of the training length; (): no passkey eval in training
            lengths=(),  # and at these prompt lengths in tokens
            depths=(0.0, 0.5, 1.0),  # depths of the key line in the passkey eval
            trials=10,  # pass keys per (length, depth) cell
            knockout=True,  # also with the memory knocked out (every gate 0; attention='infini' only)
            seed=12345,  # passkey eval seed
            chunk_segments=16,  # segments streamed through the model per step
            haystack="",  # folder of .txt books whose prose hides the key line instead of the paper's filler
        ),
    )
    config.lock()
    return config
