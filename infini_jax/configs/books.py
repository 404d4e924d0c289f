"""A small byte-level LM on a folder of books (experiments/books_lm.py): infini vs its baselines on a CPU.

    infini-train --config books:attention=infini,rule=delta \
        --config.data.data_dir=../shared/corpus/pg19 --workdir runs/books/infini_delta

Every attention kind gets the same model (parameters differ only by the infini gates, one scalar per head),
the same data order, tokens and steps. Inputs are 8 segments of 64 bytes. Infini and XL carry their memory (XL:
its cache) from one training window of a book to the next (train.carry_memory, truncated backpropagation
through time), as they do when a book is evaluated; local and full attention have nothing to carry. 1,000 steps
× 16 × 512 bytes = 8.2M bytes, about 1.4 epochs of the shared corpus's 5.7 MB of training books.
The infini gates start at sigmoid(-3) = 0.05 (model.gate_init=-3): the model starts as local attention and opens
the memory where it pays. From 0.5 (the paper's β = 0) the gates stayed at 0.42-0.59 in 1,000 steps and mixed a
read with little to add into every head: infini linear was 0.02-0.03 bits/byte behind local attention; from
0.05 it is 0.006-0.009 ahead (README, Evidence b).
"""

from infini_jax.config import parse_arg
from infini_jax.configs import base


def get_config(arg=None):
    arg = parse_arg(arg, dict(attention=("infini", "xl", "local", "full"), rule=("linear", "delta"),
                              mode=("scan", "parallel")))
    config = base.get_config()
    config.model.update(d_model=64, num_layers=3, head_dim=16, d_ff=256, n_segments=8, remat=False, gate_init=-3.0,
                        attention=arg.attention, rule=arg.rule, mode=arg.mode)
    config.data.update(name="text", data_dir="../shared/corpus/pg19")
    config.train.update(steps=1000, batch_size=16, log_every=50, ckpt_every=250, keep_checkpoints=1,
                        carry_memory=arg.attention in ("infini", "xl"))
    config.optim.update(lr=3e-3, gate_lr=1e-2, warmup_steps=50, weight_decay=0.1)
    return config
