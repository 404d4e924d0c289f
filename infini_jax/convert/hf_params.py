"""Hugging Face safetensors ↔ infini-jax parameters, one tensor at a time, straight into their shardings.

    Hugging Face tensor (model.layers.{i}. prefix)       infini-jax parameter (blocks/{i}/...)
    model.embed_tokens.weight [V, D]                     embed_vd [V, D]
    self_attn.q_proj.weight [H·K, D]                     attn/wq_dhk [D, H, K]       W.T, heads split off
    self_attn.k_proj / v_proj.weight [G·K, D]            attn/wk_dgk, wv_dgk [D, G, K]
    self_attn.o_proj.weight [D, H·K]                     attn/wo_hkd [H, K, D]
    mlp.gate_proj / up_proj.weight [F, D]                mlp/w_gate_df, w_up_df [D, F]
    mlp.down_proj.weight [D, F]                          mlp/w_down_fd [F, D]
    input_layernorm / post_attention_layernorm [D]       attn_norm/scale, mlp_norm/scale (Gemma: 1 + w)
    model.norm.weight [D]                                final_norm/scale (Gemma: 1 + w)
    lm_head.weight [V, D] (untied only)                  unembed_dv [D, V]
    infini_gates.safetensors: self_attn.gate_logit [H]   attn/gate_logit (absent: gate_init, from the config)

With model.scan_layers the blocks' parameters stack the layers on a leading axis. Both RoPEs rotate halves
(Llama's convention), so no permutation is needed.

Import: every parameter is built with `jax.make_array_from_callback` on its NamedSharding; the callback of a
device reads only that device's block of the Hugging Face tensor (`safe_open(...).get_slice`), so no device
and no host ever holds more than one tensor. Export gathers one tensor at a time and writes shards of at most
`max_shard_bytes` (with model.safetensors.index.json when there are several).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, NamedTuple, Optional

import jax
import numpy as np
from etils import epath

from infini_jax.convert import hf_config

GATES_FILE = "infini_gates.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
IGNORED = ("rotary_emb.inv_freq",)  # buffers some checkpoints store; recomputed here


class Rule(NamedTuple):
    sub: tuple  # path inside a block (or from the root for the top-level tensors)
    name: str  # Hugging Face name (after model.layers.{i}. for a block's)
    split: int  # 0: stored as is; k: W.T, whose input axis is the parameter's first k axes


BLOCK = (
    Rule(("attn", "wq_dhk"), "self_attn.q_proj.weight", 1),
    Rule(("attn", "wk_dgk"), "self_attn.k_proj.weight", 1),
    Rule(("attn", "wv_dgk"), "self_attn.v_proj.weight", 1),
    Rule(("attn", "wo_hkd"), "self_attn.o_proj.weight", 2),
    Rule(("mlp", "w_gate_df"), "mlp.gate_proj.weight", 1),
    Rule(("mlp", "w_up_df"), "mlp.up_proj.weight", 1),
    Rule(("mlp", "w_down_fd"), "mlp.down_proj.weight", 1),
    Rule(("attn_norm", "scale"), "input_layernorm.weight", 0),
    Rule(("mlp_norm", "scale"), "post_attention_layernorm.weight", 0),
)
GATE = Rule(("attn", "gate_logit"), "self_attn.gate_logit", 0)
EMBED = Rule(("embed_vd",), "model.embed_tokens.weight", 0)
FINAL_NORM = Rule(("final_norm", "scale"), "model.norm.weight", 0)
UNEMBED = Rule(("unembed_dv",), "lm_head.weight", 1)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One infini-jax parameter and the Hugging Face tensor(s) it is made of."""
    path: tuple  # key path in the params pure dict
    names: tuple  # Hugging Face names: one, or one per layer for a scan_layers stack
    split: int  # as Rule.split
    stacked: bool = False  # a leading [layers] axis (scan_layers)
    gate: bool = False  # a β gate: from infini_gates.safetensors when there is one, else gate_init
    norm: bool = False  # an RMSNorm scale (Gemma stores w of (1 + w))


def plan(cfg) -> list[Tensor]:
    """Every parameter of `cfg`'s model with its Hugging Face source, in Hugging Face's order."""
    out = [Tensor(EMBED.sub, (EMBED.name,), EMBED.split)]
    layer_rules = BLOCK + ((GATE,) if cfg.attention == "infini" else ())
    for rule in layer_rules:
        names = tuple(f"model.layers.{i}.{rule.name}" for i in range(cfg.num_layers))
        kw = dict(split=rule.split, gate=rule is GATE, norm=rule.sub[-1] == "scale")
        if cfg.scan_layers:
            out.append(Tensor(("blocks", *rule.sub), names, stacked=True, **kw))
        else:
            out += [Tensor(("blocks", i, *rule.sub), (n,), **kw) for i, n in enumerate(names)]
    out.append(Tensor(FINAL_NORM.sub, (FINAL_NORM.name,), 0, norm=True))
    if not cfg.tie_embeddings:
        out.append(Tensor(UNEMBED.sub, (UNEMBED.name,), UNEMBED.split))
    return out


def hf_shape(shape, split: int) -> tuple:
    """The Hugging Face shape [out, in] of a parameter of `shape` (one layer's)."""
    return tuple(shape) if not split else (math.prod(shape[split:]), math.prod(shape[:split]))


def to_hf(x: np.ndarray, split: int) -> np.ndarray:
    return x if not split else x.reshape(math.prod(x.shape[:split]), -1).T


class SafetensorsDir:
    """The tensors of a Hugging Face directory: model.safetensors or the shards its index names, and the
    gates file of an infini-jax export. Reads slices without loading whole files (`safe_open`, memory-mapped)."""

    def __init__(self, hf_dir: epath.PathLike):
        try:
            from safetensors import safe_open
        except ImportError as err:
            raise ValueError("reading Hugging Face checkpoints needs `safetensors`: pip install 'infini-jax[hf]'") \
                from err
        self.dir = epath.Path(hf_dir)
        self.gemma = False  # set by `opened`
        index = self.dir / INDEX_FILE
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.dir / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise FileNotFoundError(f"{self.dir} has neither {SINGLE_FILE} nor {INDEX_FILE}: export the model with "
                                    "save_pretrained(..., safe_serialization=True); .bin (pickle) is not read")
        missing = [f for f in files if not (self.dir / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.dir / INDEX_FILE} names {missing[0]}, which is missing "
                                    f"({len(missing)} of {len(files)} shards missing): download the whole directory")
        if (self.dir / GATES_FILE).is_file():
            files.append(GATES_FILE)
        self._files = {f: safe_open(os.fspath(self.dir / f), framework="numpy") for f in files}
        self.where = {name: f for f, h in self._files.items() for name in h.keys()}

    def shape(self, name: str) -> Optional[tuple]:
        f = self.where.get(name)
        return None if f is None else tuple(self._files[f].get_slice(name).get_shape())

    def read(self, name: str, index: tuple) -> np.ndarray:
        import ml_dtypes  # noqa: F401 - lets numpy (and so safetensors) read bfloat16

        return self._files[self.where[name]].get_slice(name)[index]

    def has_gates(self) -> bool:
        return GATES_FILE in self._files

    def close(self) -> None:
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check(src: SafetensorsDir, cfg, shapes: Mapping) -> None:
    """Every tensor the model needs is there with its shape, and nothing unmapped is: one error line naming
    the first problem, before anything is read."""
    tensors = plan(cfg)
    for t in tensors:
        if t.gate and not src.has_gates():
            continue
        leaf = _get(shapes, t.path).shape
        want = hf_shape(leaf[1:] if t.stacked else leaf, t.split)
        for name in t.names:
            got = src.shape(name)
            if got is None:
                raise ValueError(f"tensor {name} is not in {src.dir} (config.json implies it: a damaged or "
                                 "partial download?)")
            if got != want:
                raise ValueError(f"tensor {name} in {src.dir} has shape {list(got)}, config.json implies "
                                 f"{list(want)}")
    used = {n for t in tensors for n in t.names}
    ignorable = lambda n: n.endswith(IGNORED) or n == UNEMBED.name or ".gate_logit" in n  # noqa: E731
    extra = sorted(n for n in src.where if n not in used and not ignorable(n))
    if extra:
        raise ValueError(f"{src.dir} holds tensors infini-jax does not map ({len(extra)}, e.g. {extra[0]}): "
                         "another architecture than config.json says?")


def _get(tree: Mapping, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _flat(slices: tuple, dims: tuple) -> tuple:
    """Axes `dims` merged into one (row-major): (the covering slice of the merged axis, the covered block's
    shape, the selection inside it)."""
    inner = math.prod(dims[1:])
    s0 = slices[0]
    return slice(s0.start * inner, s0.stop * inner), (s0.stop - s0.start, *dims[1:]), (slice(None), *slices[1:])


def _read_block(src: SafetensorsDir, name: str, split: int, index: tuple, shape: tuple) -> np.ndarray:
    """The block `index` (slices) of the infini-jax parameter of `shape` made from Hugging Face tensor `name`."""
    if not split:
        return src.read(name, index)
    cols, rows = _flat(index[:split], shape[:split]), _flat(index[split:], shape[split:])
    block = src.read(name, (rows[0], cols[0])).T  # [in, out] covering the block
    return block.reshape(cols[1] + rows[1])[cols[2] + rows[2]]


def _block_fn(src: Optional[SafetensorsDir], t: Tensor, shape: tuple, dtype, gate_init: float, offset: bool):
    """make_array_from_callback's callback for one parameter: index → that device's block, each distinct block
    read once. src None: a gate the checkpoint lacks, set to gate_init. offset: Gemma's RMSNorm, (1 + w)."""
    layer_shape = shape[1:] if t.stacked else shape
    cache: dict = {}

    def one(name, index):
        if src is None:
            return np.full([s.stop - s.start for s in index], gate_init, np.float32)
        block = _read_block(src, name, t.split, index, layer_shape)
        return 1.0 + block.astype(np.float32) if offset and t.norm else block

    def callback(index):
        index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
        key = tuple((s.start, s.stop) for s in index)
        if key not in cache:
            block = np.stack([one(n, index[1:]) for n in t.names[index[0]]]) if t.stacked else one(t.names[0], index)
            cache[key] = np.asarray(block).astype(dtype)
        return cache[key]

    return callback


def opened(hf_dir: epath.PathLike, cfg, shapes: Mapping) -> SafetensorsDir:
    """`hf_dir`'s tensors, once config.json matches `cfg` and every tensor is there with its shape (`check`);
    `.gemma` tells whether its RMSNorms multiply by (1 + w)."""
    where = f"{hf_dir}/config.json"
    hf = hf_config.read_config_json(hf_dir)
    hf_config.check_matches(hf_config.model_fields(hf, where), cfg, where)
    src = SafetensorsDir(hf_dir)
    src.gemma = hf_config.arch_of(hf, where) == "gemma"
    check(src, cfg, shapes)
    return src


def load(hf_dir: epath.PathLike, cfg, shapes: Mapping, shardings: Mapping) -> dict:
    """The params pure dict, each array built on its sharding from `hf_dir`'s tensors (see the module doc)."""
    params: dict = {}
    with opened(hf_dir, cfg, shapes) as src:
        for t in plan(cfg):
            leaf = _get(shapes, t.path)
            fn = _block_fn(None if t.gate and not src.has_gates() else src, t, leaf.shape, leaf.dtype,
                           cfg.gate_init, src.gemma)
            _set(params, t.path, jax.make_array_from_callback(leaf.shape, _get(shardings, t.path), fn))
    return params


def _host(x: jax.Array) -> np.ndarray:
    """The whole array on this host (gathered across processes when it is not fully addressable)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _pack(sizes: list[int], limit: int) -> list[int]:
    """The shard of each tensor, in order; a shard holds at most `limit` bytes unless one tensor is bigger."""
    out, shard, used = [], 0, 0
    for size in sizes:
        if used and used + size > limit:
            shard, used = shard + 1, 0
        out.append(shard)
        used += size
    return out


def _hf_tensor(params: Mapping, t: Tensor, layer: int, gemma: bool) -> np.ndarray:
    x = _get(params, t.path)
    dtype = x.dtype
    x = _host(x[layer] if t.stacked else x)
    if gemma and t.norm:
        x = x.astype(np.float32) - 1.0
    return np.ascontiguousarray(to_hf(x, t.split).astype(dtype))


def export(params: Mapping, cfg, out_dir: epath.PathLike, *, like: Optional[Mapping[str, Any]] = None,
           max_shard_bytes: int = 2 << 30) -> list[str]:
    """Writes `params` as a Hugging Face checkpoint: config.json, the safetensors (one file, or shards of at
    most max_shard_bytes and model.safetensors.index.json) and, for attention='infini', infini_gates.safetensors
    (its metadata holds the whole ModelConfig). Returns the file names. Every process calls it; process 0
    writes. `like`: the config.json the model came from (its token ids and other keys are kept)."""
    from safetensors.numpy import save_file

    gemma = hf_config.arch_for(cfg) == "gemma"
    entries = [(t, i, name) for t in plan(cfg) for i, name in enumerate(t.names)]
    weights = [e for e in entries if not e[0].gate]
    sizes = [math.prod(hf_shape(_get(params, t.path).shape[int(t.stacked):], t.split))
             * _get(params, t.path).dtype.itemsize for t, _, _ in weights]
    shard_of = _pack(sizes, max_shard_bytes)
    n = shard_of[-1] + 1
    shard_names = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    files: dict[str, list] = {}
    for entry, k in zip(weights, shard_of):
        files.setdefault(shard_names[k], []).append(entry)
    if len(entries) > len(weights):
        files[GATES_FILE] = [e for e in entries if e[0].gate]
    out, writing = epath.Path(out_dir), jax.process_index() == 0
    if writing:
        out.mkdir(parents=True, exist_ok=True)
    for file, group in files.items():
        tensors = {name: _hf_tensor(params, t, i, gemma) for t, i, name in group}
        meta = {"format": "pt"}
        if file == GATES_FILE:
            meta["infini_jax_model"] = json.dumps(dataclasses.asdict(cfg))
        if writing:
            save_file(tensors, os.fspath(out / file), metadata=meta)
    if writing:
        if n > 1:
            weight_map = {name: shard_names[k] for (_, _, name), k in zip(weights, shard_of)}
            (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": int(sum(sizes))},
                                                      "weight_map": weight_map}, indent=1))
        dtype = str(np.dtype(_get(params, EMBED.sub).dtype))
        (out / "config.json").write_text(json.dumps(hf_config.hf_config(cfg, like, dtype), indent=1))
    return sorted(files) + ["config.json"] + ([INDEX_FILE] if n > 1 else [])
