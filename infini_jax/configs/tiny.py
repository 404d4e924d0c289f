"""The embedded default: a tiny Infini-Transformer learning the paper's passkey task on a 2-core CPU.

Data is generated (no download): the paper's passkey prompt with its filler, byte-level tokens.
    infini-train --config tiny --workdir /tmp/tiny          (or: python train.py --config tiny ...)
    infini-train --config tiny:rule=delta,attention=xl --config.train.steps=50 ...

The recipe (chosen with measured runs; the README's Evidence section lists them and what was tried):
  * 2 layers, d_model 64, 4 heads x 16, a small gated FFN (d_ff 64: it learnt the task ~2x faster than 256 and
    costs ~40% less per step), segments of 32 bytes, training inputs of 10 segments (320 bytes);
  * batch 16, split over 2 CPU devices (train.cpu_devices) so that both cores of a small CPU work;
  * examples of 104..321 tokens (0 to 2 fillers), right-padded, half of them with the paper's intro sentence;
  * loss on the answer and on the key line's second copy of the key (data.passkey_loss_on_key);
  * from half-way on, in half the rows, the key line shifted by a random filler tail (data.passkey_shift), so
    it is seen at every offset within a segment, as prompts of other lengths put it;
  * memory-mass augmentation from half-way on: in half the rows the writes of every segment without the key
    line count c ~ log-uniform[1, 65536] times, i.e. haystacks up to ~19M tokens at no extra compute (with c <=
    128 from step 2,400, retrieval fell to chance beyond ~41K tokens; experiments/passkey_1m.py);
  * rule=delta only: the haystack before the key line written in 4 interleaved passes of c / 4
    (model.mass_passes; mass.interleaved_passes). One c-fold delta write per segment leaves a different
    memory than a real haystack, whose filler repeats interleave: with it a delta model that scored 100% on
    augmented rows of any c held 78-100% on real 2^20-token prompts; with the passes, 100% at every depth, two
    seeds, both with --steps 6000 (experiments/passkey_1m.py and passkey_augmented.py, README Evidence a).
    The linear rule needs none (every split of c is exact);
  * at the end, config.evals prints the passkey digit accuracy at 1x, 16x and 64x the training length, with
    the memory and with it knocked out.
"""

from infini_jax.config import parse_arg
from infini_jax.configs import base


def get_config(arg=None):
    arg = parse_arg(arg, dict(rule=("linear", "delta"), attention=("infini", "xl", "local", "full"),
                              mode=("scan", "parallel")))
    config = base.get_config()
    config.model.update(d_model=64, head_dim=16, d_ff=64, segment_len=32, n_segments=10, remat=False,
                        attention=arg.attention, rule=arg.rule, mode=arg.mode,
                        mass_passes=4 if arg.rule == "delta" else 1)
    config.data.update(passkey_min_len=104, passkey_intro=0.5, passkey_loss_on_key=True, passkey_shift=0.5,
                       passkey_shift_after=1500, passkey_mass_prob=0.5,
                       passkey_mass_max=65536.0, passkey_mass_after=1500)
    config.train.update(steps=3000, batch_size=16, cpu_devices=2, log_every=100, eval_every=1000, ckpt_every=1000)
    config.optim.update(lr=3e-3, gate_lr=1e-2, warmup_steps=30, weight_decay=0.1)
    # evaluators run at the end of training: passkey digit accuracy at 1x, 16x and 64x the training length
    config.evals.passkey.x = (1, 16, 64)
    return config
