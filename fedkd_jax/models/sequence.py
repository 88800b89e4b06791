"""The field's reference next-token models (flax.nnx), each returning ``(logits, features)``.

Input ``x [B, L]`` float32 holding token ids in ``[0, V)`` (the engine's
rows are float32; ids up to 2^24 are exact), cast to int32 inside; an id
outside ``[0, V)`` embeds as NaN, so a vocabulary mismatch shows at once. Output
``logits [B, L, V]`` -- position ``t`` predicts token ``t + 1`` -- and
``features [B, F]``: the input of the output layer averaged over all ``L``
positions, padding included (a fixed-shape summary for the distillation
hint losses; a masked mean would need the padding id, which is the data's
business). The recurrences are one ``lax.scan`` over positions each, so a
model compiles once per sequence length, and nothing is random at apply
time, so ``apply`` vmaps over clients.

* :class:`CharLSTM` -- the Shakespeare character model of McMahan et al. 2017
  (Sec. 3) as used by Reddi et al. 2021 (google-research/federated
  ``shakespeare_models.create_recurrent_model``): embedding 8, two LSTM layers
  of 256, a dense layer to the vocabulary. With TFF's vocabulary (86
  characters + pad, OOV, BOS, EOS = 90) it has 820,522 parameters. McMahan et
  al. report 866,578 for a vocabulary they do not state.
* :class:`NWPLSTM` -- the Stack Overflow next-word model of Reddi et al. 2021
  (``stackoverflow_models.create_recurrent_model``): embedding 96, one LSTM of
  670, a dense projection 670 -> 96 (no activation), a dense layer to the
  vocabulary (untied from the input embedding, Reddi et al.'s setting): the
  10,000 most frequent words + pad, OOV, BOS, EOS = 10,004 ids, 4,050,748
  parameters. ``features`` are the 96-wide projections.
* :class:`Transformer` -- a small causal decoder-only transformer (Vaswani et
  al. 2017; pre-LayerNorm blocks as in GPT-2, Radford et al. 2019) for the
  same two tasks: learned token and position embeddings, ``layers`` blocks of
  causal multi-head self-attention and a GELU MLP (4x), a final LayerNorm and
  an untied output layer. Defaults 2 layers, ``d_model`` 128, 4 heads.

LSTMs use flax's ``OptimizedLSTMCell`` (one bias per gate, like Keras;
gates i, f, g, o) with the reference initialisers: He-normal input kernels,
orthogonal recurrent kernels, forget-gate bias 1 (Keras' ``unit_forget_bias``),
uniform(-0.05, 0.05) embeddings, Glorot-normal dense layers. Keras'
``mask_zero`` skips padded steps; padding sits at the end of each sequence
in these tasks, so outputs at real tokens are the same without it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_glorot = nnx.initializers.glorot_normal()
_embed_init = nnx.initializers.uniform(0.1)  # shifted to [-0.05, 0.05) below


def _embedding(vocab: int, dim: int, rngs: nnx.Rngs) -> nnx.Embed:
    init = lambda key, shape, dtype=jnp.float32: _embed_init(key, shape, dtype) - 0.05  # noqa: E731
    return nnx.Embed(vocab, dim, embedding_init=init, rngs=rngs)


def _forget_bias_one(key, shape, dtype=jnp.float32):
    hidden = shape[-1] // 4
    return jnp.zeros(shape, dtype).at[..., hidden:2 * hidden].set(1.0)


class LSTM(nnx.Module):
    """One LSTM layer over a whole sequence: ``[B, L, E] -> [B, L, H]``, zero initial state."""

    def __init__(self, in_features: int, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = hidden
        self.cell = nnx.OptimizedLSTMCell(in_features, hidden, kernel_init=nnx.initializers.he_normal(),
                                          recurrent_kernel_init=nnx.initializers.orthogonal(),
                                          bias_init=_forget_bias_one, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        # zeros typed like x (inside the engine's shard_map x varies over the clients axis)
        zeros = jnp.broadcast_to(jnp.zeros_like(x[:, :1, 0]), (x.shape[0], self.hidden))
        _, hs = jax.lax.scan(lambda carry, xt: self.cell(carry, xt), (zeros, zeros), jnp.swapaxes(x, 0, 1))
        return jnp.swapaxes(hs, 0, 1)


def _tokens(x: jax.Array) -> jax.Array:
    return x.astype(jnp.int32)


class CharLSTM(nnx.Module):
    """Embedding -> ``layers`` LSTMs -> dense to the vocabulary; ``features`` = last LSTM output, mean over ``L``."""

    def __init__(self, vocab_size: int, seq_len: int, *, embed: int = 8, hidden: int = 256, layers: int = 2,
                 rngs: nnx.Rngs):
        self.in_features = seq_len
        self.embed = _embedding(vocab_size, embed, rngs)
        sizes = [embed] + [hidden] * layers
        self.lstms = nnx.List([LSTM(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.head = nnx.Linear(hidden, vocab_size, kernel_init=_glorot, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = self.embed(_tokens(x))
        for lstm in self.lstms:
            h = lstm(h)
        return self.head(h), h.mean(axis=1)


class NWPLSTM(nnx.Module):
    """Embedding -> LSTM -> linear projection to ``embed`` -> dense to the vocabulary."""

    def __init__(self, vocab_size: int, seq_len: int, *, embed: int = 96, hidden: int = 670, layers: int = 1,
                 rngs: nnx.Rngs):
        self.in_features = seq_len
        self.embed = _embedding(vocab_size, embed, rngs)
        # Reddi et al.'s code projects back to the embedding width after every LSTM layer.
        self.lstms = nnx.List([LSTM(embed, hidden, rngs=rngs) for _ in range(layers)])
        self.projs = nnx.List([nnx.Linear(hidden, embed, kernel_init=_glorot, rngs=rngs) for _ in range(layers)])
        self.head = nnx.Linear(embed, vocab_size, kernel_init=_glorot, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = self.embed(_tokens(x))
        for lstm, proj in zip(self.lstms, self.projs):
            h = proj(lstm(h))
        return self.head(h), h.mean(axis=1)


class Block(nnx.Module):
    """Pre-LN transformer block: ``x + MHA(LN(x))`` (causal), then ``x + MLP(LN(x))``."""

    def __init__(self, d_model: int, heads: int, mlp: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d_model, qkv_features=d_model, out_features=d_model,
                                           decode=False, keep_rngs=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.fc1 = nnx.Linear(d_model, mlp, rngs=rngs)
        self.fc2 = nnx.Linear(mlp, d_model, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x), mask=mask, deterministic=True)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class Transformer(nnx.Module):
    """Causal decoder-only transformer; ``features`` = final LayerNorm output, mean over ``L``."""

    def __init__(self, vocab_size: int, seq_len: int, *, d_model: int = 128, heads: int = 4, layers: int = 2,
                 mlp: int | None = None, rngs: nnx.Rngs):
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not a multiple of heads {heads}")
        self.in_features = seq_len
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(vocab_size, d_model, embedding_init=init, rngs=rngs)
        self.pos = nnx.Param(init(rngs.params(), (seq_len, d_model)))
        self.blocks = nnx.List([Block(d_model, heads, mlp or 4 * d_model, rngs=rngs) for _ in range(layers)])
        self.ln = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, vocab_size, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        tok = _tokens(x)
        h = self.embed(tok) + self.pos[...][: tok.shape[1]]
        mask = nnx.make_causal_mask(tok)
        for block in self.blocks:
            h = block(h, mask)
        h = self.ln(h)
        return self.head(h), h.mean(axis=1)
