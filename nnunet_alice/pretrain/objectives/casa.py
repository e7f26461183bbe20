"""CASA: conditional anatomical semantic alignment (Alice Sec. 3.3, arXiv 2302.05615; docs/method.md "Teacher and
losses").

One post-norm transformer cross-attention layer (the official "code version"): 8 heads, d_k = dim / heads
(64 for dim 512), bias-free Q/K/V/output projections, scaled dot product (1/sqrt(d_k)), attention and output
dropout, residual from the **query**, LayerNorm(eps 1e-6), then a ReLU FFN dim -> ffn_dim -> dim with
dropout, residual and LayerNorm. No masks, no positional encodings. Every parameter is used by the online
branch (the official module had four unused linears, bug B6 in docs/method.md).

Online and target branches (Alice Sec. 3.3, Fig. 3), each built from one side only:

* online, :meth:`forward`: S = CASA(query = student encoder tokens of the masked view, K/V = student decoder
  tokens) -- the only branch with gradients;
* target, :meth:`target` (always under ``torch.no_grad``, inputs detached, dropout off): T = CASA(query =
  the **teacher's** encoder tokens of the unmasked view, K/V = teacher tokens), so T is a function of the
  teacher alone:

  - ``teacher_encoder_ema`` (paper Fig. 3): K/V = teacher encoder tokens, every weight of the layer (query,
    key, value and output projections, both LayerNorms, the FFN) an EMA copy of the online one;
  - ``teacher_decoder_shared`` (official code's shared module): K/V = teacher decoder tokens, the online
    weights (no gradient).

  The official code (and the paper's figure) feed the *student's* query to the target branch too and add it
  back as the residual, so S and T share their largest term and the CE between them can fall with teacher
  tokens that carry nothing (measured: from 1.96 to 0.07 in 150 steps with pure-noise teacher tokens). Taking
  the teacher's own query removes that path; with it both branches are the same function of one side's
  tokens, as in the teacher-student losses of DINO/iBOT. The EMA copies are *buffers* (``ema_<param>``, never
  trained), so ``parameters()`` holds only online weights (clean optimiser groups, no unused DDP parameters)
  while ``state_dict()`` still saves them. Update them with :meth:`update_target` after every optimiser step,
  with the teacher's momentum.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
from torch import nn
from torch.nn import functional as F

from nnunet_alice.pretrain.config import CASA_TARGETS  # the two target modes, defined with the other settings

__all__ = ["CasaAlignment", "CASA_TARGETS"]


# online parameters that have an EMA copy on the target side (all of them)
_EMA_PARAMS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight", "norm1.weight", "norm1.bias",
               "ffn_in.weight", "ffn_in.bias", "ffn_out.weight", "ffn_out.bias", "norm2.weight", "norm2.bias")


def _buffer_name(param_name: str) -> str:
    return "ema_" + param_name.replace(".", "_")


class CasaAlignment(nn.Module):
    """Cross-attention alignment layer. Tokens are (B, N, dim); outputs have the query's shape (B, Nq, dim).

    Args:
        dim: token width (512: CASA runs on the 512-d head outputs in the official placement).
        num_heads: attention heads (8); ``dim`` must be divisible by it.
        ffn_dim: hidden width of the FFN (2048).
        dropout: attention, output and FFN dropout of the online branch (0.1).
        ema_target: keep the EMA target copies needed by ``teacher_encoder_ema``; ``False`` saves the memory
            when only ``teacher_decoder_shared`` is used.
    """

    def __init__(self, dim: int = 512, num_heads: int = 8, ffn_dim: int = 2048, dropout: float = 0.1,
                 ema_target: bool = True, eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads, self.head_dim = int(dim), int(num_heads), int(dim) // int(num_heads)
        self.dropout, self.eps = float(dropout), float(eps)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.ffn_in = nn.Linear(dim, ffn_dim)
        self.ffn_out = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        for m in (self.q_proj, self.k_proj, self.v_proj, self.out_proj, self.ffn_in, self.ffn_out):  # Xavier
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        self.ema_target = bool(ema_target)
        if self.ema_target:
            online = dict(self.named_parameters())
            for n in _EMA_PARAMS:
                self.register_buffer(_buffer_name(n), online[n].detach().clone())

    # ----------------------------------------------------------------------------------------------------
    def _online_weights(self) -> Dict[str, torch.Tensor]:
        params = dict(self.named_parameters())
        return {n: params[n] for n in _EMA_PARAMS}

    def _target_weights(self) -> Dict[str, torch.Tensor]:
        if not self.ema_target:
            raise RuntimeError("casa_target 'teacher_encoder_ema' needs CasaAlignment(ema_target=True)")
        return {n: getattr(self, _buffer_name(n)) for n in _EMA_PARAMS}

    def _check(self, name: str, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"CASA {name} must be (B, N, {self.dim}), got {tuple(x.shape)}")

    def _layer(self, query: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, w: Dict[str, torch.Tensor],
               p: float) -> torch.Tensor:
        """Attention with projected query ``q`` over ``kv`` and the post-attention block, weights from ``w``."""
        b, nq, _ = q.shape
        nk = kv.shape[1]
        k = F.linear(kv, w["k_proj.weight"])
        v = F.linear(kv, w["v_proj.weight"])
        heads = lambda t, n: t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        ctx = F.scaled_dot_product_attention(heads(q, nq), heads(k, nk), heads(v, nk), dropout_p=p,
                                             scale=1.0 / math.sqrt(self.head_dim))
        ctx = ctx.transpose(1, 2).reshape(b, nq, self.dim)
        x = F.dropout(F.linear(ctx, w["out_proj.weight"]), p, training=p > 0) + query
        x = F.layer_norm(x, (self.dim,), w["norm1.weight"], w["norm1.bias"], self.eps)
        y = F.linear(F.relu(F.linear(x, w["ffn_in.weight"], w["ffn_in.bias"])), w["ffn_out.weight"],
                     w["ffn_out.bias"])
        x = F.dropout(y, p, training=p > 0) + x
        return F.layer_norm(x, (self.dim,), w["norm2.weight"], w["norm2.bias"], self.eps)

    # ----------------------------------------------------------------------------------------------------
    def forward(self, query_tokens: torch.Tensor, kv_tokens: torch.Tensor) -> torch.Tensor:
        """Online branch S = CASA(query = student encoder tokens, K/V = student decoder tokens)."""
        self._check("query_tokens", query_tokens)
        self._check("kv_tokens", kv_tokens)
        p = self.dropout if self.training else 0.0
        return self._layer(query_tokens, self.q_proj(query_tokens), kv_tokens, self._online_weights(), p)

    @torch.no_grad()
    def target(self, teacher_query: torch.Tensor, teacher_tokens: torch.Tensor,
               mode: str = "teacher_encoder_ema") -> torch.Tensor:
        """Target branch T (no graph, dropout off) from teacher tokens only; ``mode`` is one of :data:`CASA_TARGETS`.

        ``teacher_query``: the teacher's encoder tokens (B, Nq, dim), the query and the residual.
        ``teacher_tokens``: K/V, the teacher *decoder* tokens for ``teacher_decoder_shared`` and the teacher
        *encoder* tokens for ``teacher_encoder_ema``; both go through the same head first, so both are
        (B, Nk, dim).
        """
        if mode not in CASA_TARGETS:
            raise ValueError(f"unknown CASA target mode {mode!r}; expected one of {CASA_TARGETS}")
        self._check("teacher_query", teacher_query)
        self._check("teacher_tokens", teacher_tokens)
        query, kv = teacher_query.detach(), teacher_tokens.detach()
        w = self._online_weights() if mode == "teacher_decoder_shared" else self._target_weights()
        out = self._layer(query, F.linear(query, w["q_proj.weight"]), kv, w, 0.0)
        return out.detach()

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """EMA of the target-side copies: w' <- m w' + (1 - m) w (paper Fig. 3; same m as the teacher)."""
        if not self.ema_target:
            return
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        m, online = float(momentum), self._online_weights()
        for n in _EMA_PARAMS:
            getattr(self, _buffer_name(n)).mul_(m).add_(online[n].detach(), alpha=1.0 - m)
