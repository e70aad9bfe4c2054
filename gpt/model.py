"""The GPT-2 model in one file: embeddings, pre-LayerNorm blocks, (usually tied) output head.

Parameter names follow Hugging Face's GPT-2 (wte, wpe, h.N.attn.c_attn, ...) so that checkpoints
map one to one; the only difference is that Kettle uses nn.Linear ([out, in]) where GPT-2 has
Conv1D ([in, out]).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.config import GPTConfig


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions.

    `pos` is the number of positions already filled. The engine rewinds it (`truncate`) to reuse
    a shared prefix between two prompts instead of prefilling it again.
    """

    def __init__(
        self, config: GPTConfig, batch_size: int = 1, *, max_len: int | None = None, device=None, dtype=torch.float32
    ):
        max_len = max_len or config.context_length
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def truncate(self, pos: int) -> None:
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot truncate a cache holding {self.pos} positions to {pos}")
        self.pos = pos


class RowCache:
    """A KV cache as the decoding step reads it for rows each at a position of its own: rows
    0..B-1 of `k` and `v` ([n_layer, rows, n_head, max_len, head_dim]), row b's new token going
    to position pos[b] (a tensor), keys attended up to `span`, each row's past its own position
    masked. gpt.batching's step attends as far as its longest row; a compiled step (gpt.engine's
    CompiledStep) the whole cache, so that every step has the same shapes."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, *, pos: torch.Tensor, span: int):
        self.k, self.v, self.pos, self.span, self.max_len = k, v, pos, span, k.size(3)
        self.rows = torch.arange(pos.numel(), device=pos.device)
        self.hidden = (torch.arange(span, device=pos.device) > pos[:, None]).unsqueeze(1)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading token ids `a` and `b` share: the cached positions still valid when a
    cache filled for `a` continues with `b`."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.scale = 1.0 / math.sqrt(config.head_dim)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, norm: nn.LayerNorm | None = None
    ) -> torch.Tensor:
        """x is [B, T, C]; or [B, C] for a decoding step (one new token per sequence, cached).
        With `norm`, x is the residual stream and the attention reads norm(x) (norm_then_linear)."""
        if x.dim() == 2:
            y = self._decode_step(x if norm is None else norm(x), cache, layer=layer)
        else:
            y = self._attend(norm_then_linear(norm, self.c_attn, x=x), cache, layer=layer)
        return _dropout(self.c_proj(y), self.dropout, training=self.training)

    def _attend(self, qkv, cache, *, layer):
        B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        mask, is_causal = None, True
        if cache is not None:
            start, end = cache.pos, cache.pos + T
            cache.k[layer, :B, :, start:end] = k
            cache.v[layer, :B, :, start:end] = v
            if start > 0:  # with nothing cached before, the new keys and values are all there is
                k, v = cache.k[layer, :B, :, :end], cache.v[layer, :B, :, :end]
                # New queries sit after the cached positions: SDPA's is_causal aligns the mask to
                # the top-left corner, so the offset mask is built here.
                mask = torch.ones(T, end, dtype=torch.bool, device=qkv.device).tril(diagonal=start)
                is_causal = False
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return y.transpose(1, 2).contiguous().view(B, T, C)

    def _decode_step(self, x, cache, *, layer):
        """Attention for one new query per sequence. Every decoded token pays for each op here,
        and at batch 1 the ops are tiny, so there are few of them: 2-D activations, batched
        matmuls over (sequence, head) and no transposes. SDPA's kernels cost more than the work
        itself at this size."""
        B, C = x.shape
        H, pos = self.n_head, cache.pos
        q, k, v = self.c_attn(x).view(B, 3, H, C // H).unbind(1)  # each [B, H, head_dim]
        per_row = isinstance(pos, torch.Tensor)  # a RowCache: each row at its own position
        if per_row:
            cache.k[layer, cache.rows, :, pos] = k
            cache.v[layer, cache.rows, :, pos] = v
            span = cache.span  # the longest row's keys; the others' are masked past their end
        else:
            cache.k[layer, :B, :, pos] = k
            cache.v[layer, :B, :, pos] = v
            span = pos + 1
        keys = cache.k[layer, :B, :, :span].reshape(B * H, span, C // H)  # views, no copy
        values = cache.v[layer, :B, :, :span].reshape(B * H, span, C // H)
        att = torch.bmm(q.reshape(B * H, 1, C // H), keys.transpose(1, 2)) * self.scale
        if per_row:  # a shorter row's slots past its position hold stale keys, never its own
            att = att.view(B, H, span).masked_fill(cache.hidden, float("-inf")).view(B * H, 1, span)
        # [B * H, 1, head_dim] has the memory layout of [B, C].
        return torch.bmm(att.softmax(dim=-1), values).view(B, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_width)
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm | None = None) -> torch.Tensor:
        """With `norm`, x is the residual stream and the MLP reads norm(x) (norm_then_linear)."""
        u = norm_then_linear(norm, self.c_fc, x=x)
        # A plain Linear only: LoRA wraps c_proj in a module of its own, kept on autograd's path.
        if u.requires_grad and type(self.c_proj) is nn.Linear and not torch.is_autocast_enabled(u.device.type):
            y = _GeluProjection.apply(u, self.c_proj.weight, self.c_proj.bias)
        else:
            y = self.c_proj(F.gelu(u, approximate="tanh"))
        return _dropout(y, self.dropout, training=self.training)


class _GeluProjection(torch.autograd.Function):
    """c_proj(gelu(u)) that keeps only u for the backward pass and recomputes the GELU there.
    Autograd would keep both u (for GELU's gradient) and gelu(u) (for c_proj's weight gradient):
    at GPT-2 124M and 4x256 tokens those are 144 MB each, the largest activations a step holds.
    The recomputation is one elementwise pass, well under 1% of the step. fp32 only: under
    autocast (bf16 on GPUs) the activations are half the size and autograd's path is kept."""

    @staticmethod
    def forward(ctx, u, weight, bias):
        ctx.save_for_backward(u, weight)
        ctx.has_bias = bias is not None
        # GPT-2 uses the tanh approximation of GELU; the exact form would not match its weights.
        return F.linear(F.gelu(u, approximate="tanh"), weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        u, weight = ctx.saved_tensors
        a = F.gelu(u, approximate="tanh")
        grad_w = grad_y.flatten(0, -2).t() @ a.flatten(0, -2) if ctx.needs_input_grad[1] else None
        grad_b = grad_y.flatten(0, -2).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_u = (
            torch.ops.aten.gelu_backward(grad_y @ weight, u, approximate="tanh") if ctx.needs_input_grad[0] else None
        )
        return grad_u, grad_w, grad_b


def norm_then_linear(norm: nn.LayerNorm | None, linear: nn.Module, *, x: torch.Tensor) -> torch.Tensor:
    """linear(norm(x)) (linear(x) without a norm). In fp32 training through a plain Linear, the
    norm's output is recomputed in backward instead of kept (_NormLinear); elsewhere (inference,
    autocast, LoRA's wrapped Linear) autograd's own path."""
    if norm is None:
        return linear(x)
    if (
        x.requires_grad
        and type(linear) is nn.Linear
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled(x.device.type)
    ):
        return _NormLinear.apply(x, norm.weight, norm.bias, linear.weight, linear.bias, norm.eps)
    return linear(norm(x))


class _NormLinear(torch.autograd.Function):
    """linear(layer_norm(x)) that keeps x and the norm's statistics for the backward pass, not
    the norm's output: autograd would keep both x (for the norm's gradient) and the normalised
    x (for the weight's gradient). Each block has two (attention's and the MLP's input): 72 MB
    at GPT-2 124M and 4x256 tokens. Recomputing the norm from the kept statistics is one
    elementwise pass; its gradient is the one aten computes for LayerNorm."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, weight, bias, eps):
        shape = (x.size(-1),)
        normed, mean, rstd = torch.native_layer_norm(x, shape, norm_weight, norm_bias, eps)
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, weight)
        ctx.has_bias = bias is not None
        return F.linear(normed, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, mean, rstd, norm_weight, norm_bias, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        normed = (x - mean) * rstd * norm_weight + norm_bias
        flat_grad = grad_y.flatten(0, -2)
        grad_w = flat_grad.t() @ normed.flatten(0, -2) if need[3] else None
        grad_b = flat_grad.sum(0) if ctx.has_bias and need[4] else None
        grad_x = grad_nw = grad_nb = None
        if need[0] or need[1] or need[2]:
            grad_x, grad_nw, grad_nb = torch.ops.aten.native_layer_norm_backward(
                grad_y @ weight, x, (x.size(-1),), mean, rstd, norm_weight, norm_bias, [need[0], need[1], need[2]]
            )
        return grad_x, grad_nw, grad_nb, grad_w, grad_b, None


def _dropout(x: torch.Tensor, p: float, *, training: bool) -> torch.Tensor:
    # A function rather than nn.Dropout modules: in inference it costs nothing per call.
    return F.dropout(x, p, training=True) if training and p else x


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(x, cache, layer, norm=self.ln_1)
        return x + self.mlp(x, norm=self.ln_2)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.context_length, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.apply(self._init_weights)
        if not config.tie_embeddings:  # the book's (PyTorch's default) embedding init
            nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
            nn.init.normal_(self.wpe.weight, mean=0.0, std=1.0)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * n_layer):
        # each block adds to it twice.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def tie_weights(self) -> None:
        """Share the token embedding with the output head, as GPT-2 does (when the config ties them).
        Loading with assign=True replaces parameters, so loaders call this again afterwards."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def weights(self) -> dict[str, torch.Tensor]:
        """The state dict without the tied head, which is the embedding stored a second time:
        what checkpoints hold."""
        state = self.state_dict()
        if self.config.tie_embeddings:
            del state["lm_head.weight"]
        return state

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum({_elements(p): p.numel() for p in self.parameters()}.values())
        return n - self.wpe.weight.numel() if non_embedding else n

    def hidden_states(
        self,
        idx: torch.Tensor,
        kv_cache: KVCache | None = None,
        *,
        sparse_embedding_grad: bool = False,
    ) -> torch.Tensor:
        """The final-LayerNorm outputs, [B, T, n_embd]; classification heads start from here.
        `sparse_embedding_grad`: only for a loss through the tied head (see _embed)."""
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if isinstance(start, torch.Tensor):
            # gpt.batching's step: one token per row at the row's own position (kept in range
            # there), on the blocks' decoding-step path; no dropout, it only serves.
            x, decoding = self.wte(idx.view(B)) + self.wpe(start), True
        else:
            if start + T > self.config.context_length:
                raise ValueError(
                    f"sequence of {start + T} tokens exceeds the context length {self.config.context_length}"
                )
            if kv_cache is not None and start + T > kv_cache.max_len:
                raise ValueError(f"KV cache holds {kv_cache.max_len} positions, {start + T} needed")
            x = self._embed(idx, sparse_embedding_grad) + self.wpe.weight[start : start + T]
            x = _dropout(x, self.config.dropout, training=self.training)
            decoding = kv_cache is not None and T == 1
            if decoding:
                x = x.view(B, -1)  # the blocks' decoding-step path (see CausalSelfAttention.forward)
        for i, block in enumerate(self.h):
            x = block(x, kv_cache, i)
        if kv_cache is not None and not isinstance(start, torch.Tensor):
            kv_cache.pos += T  # rows at positions of their own are moved by their owner (RowCache)
        x = self.ln_f(x)
        return x.view(B, 1, -1) if decoding else x

    def _embed(self, idx: torch.Tensor, sparse_grad: bool) -> torch.Tensor:
        # With the head tied, the embedding's gradient is added to the head's, which is dense
        # already: as a sparse gradient (the rows of this batch's tokens) it is added in place,
        # where the dense one would first fill a second [vocab, n_embd] tensor (154 MB at GPT-2's
        # size) at the end of the backward pass, when every other gradient exists too. Untied,
        # it stays dense, as it does when no loss goes through the head (a classifier's): the
        # optimizers take dense gradients only.
        sparse = sparse_grad and self.config.tie_embeddings and torch.is_grad_enabled()
        return F.embedding(idx, self.wte.weight, sparse=sparse)

    def forward(
        self,
        idx: torch.Tensor,
        kv_cache: KVCache | None = None,
        *,
        last_only: bool = False,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for token ids `idx` [B, T].

        With `kv_cache`, the tokens continue the cached sequence (positions start at cache.pos)
        and the cache is extended. `last_only` computes logits for the last position only, which
        is all decoding needs and saves the largest matrix product. With `targets` [B, T] (the
        next token at each position) it returns the mean cross-entropy instead, computed in
        chunks so the full logits never exist (head_cross_entropy).
        """
        x = self.hidden_states(idx, kv_cache, sparse_embedding_grad=targets is not None)
        if targets is not None:
            return head_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets=targets.flatten())
        if last_only:
            x = x[:, -1:, :]
        return self.lm_head(x)

    def configure_optimizers(
        self,
        weight_decay: float,
        learning_rate: float,
        *,
        betas: tuple[float, float],
        device_type: str,
        extra: Iterable[nn.Parameter] = (),
    ) -> torch.optim.AdamW:
        """AdamW over the parameters that train (LoRA and a classifier freeze the others) and
        `extra`, those of a module built on this model (a classification head). Matrices and
        embeddings are decayed; biases and norms are not."""
        params = [p for p in (*self.parameters(), *extra) if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # The fused kernel runs on CUDA and, since torch 2.4, on CPU, where it is several times
        # faster than the default for-each version: for GPT-2 124M the optimizer step would
        # otherwise take longer than the forward and backward passes.
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 per weight (2 forward, 4 backward) plus attention's over
        `seq_len` positions (PaLM appendix B); the position embedding is a lookup, not counted."""
        n = self.num_params(non_embedding=True)
        return 6 * n + 12 * self.config.n_layer * self.config.n_embd * seq_len

    def estimate_mfu(self, tokens_per_s: float, *, seq_len: int, peak_flops: float) -> float:
        """Model FLOPs utilisation: the share of `peak_flops` (FLOP/s of all the devices that
        train together, gpt.device.peak_flops) that training at `tokens_per_s` uses."""
        return self.flops_per_token(seq_len) * tokens_per_s / peak_flops


# Rows of logits made at once by head_cross_entropy: 2**24 fp32 values (64 MB; 333 rows of
# GPT-2's vocabulary), enough for the matrix products to run at full speed.
LOSS_CHUNK_ELEMENTS = 2**24


def _elements(p: torch.Tensor):
    """Which elements `p` holds: a tied table counts once, also where one side is a transposed
    view of the other (gpt.quantize's decoding layout)."""
    if p.device.type == "meta":
        return id(p)
    return p.untyped_storage().data_ptr(), p.storage_offset(), p.numel()


def head_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, *, targets: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """F.cross_entropy(F.linear(h, weight).float(), targets), the mean over rows, with the same
    value and gradients, without materialising the [rows, vocab] fp32 logits and their gradient:
    at GPT-2's vocabulary they dominate a training step's peak memory."""
    rows = chunk_rows or max(1, LOSS_CHUNK_ELEMENTS // weight.size(0))
    return _HeadCrossEntropy.apply(h, weight, targets, rows)


class _HeadCrossEntropy(torch.autograd.Function):
    """Each chunk of rows makes its logits, its share of the loss and, right away, its share of
    both gradients (softmax minus one-hot, through the head), then frees its logits. The loss is
    a scalar, so backward only scales the gradients computed here: the matrix products are the
    ones autograd's backward would run, not a recomputation."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows):
        device = h.device.type
        # Under autocast the head's products run in its dtype (bf16), as F.linear's would.
        mm = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        need_h, need_w = ctx.needs_input_grad[:2]
        n = h.size(0)
        with torch.autocast(device, enabled=False):
            w, hm = weight.to(mm), h.to(mm)
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(hm) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
            # One buffer for every chunk's logits, worked on in place: a fresh product per chunk
            # would be allocated while the last chunk's is still held, and logsumexp makes a
            # temporary of the chunk's size; together three chunks (192 MB at GPT-2's size).
            chunk = torch.empty(min(chunk_rows, n), weight.size(0), dtype=torch.float32, device=h.device)
            for start in range(0, n, chunk_rows):
                hc, tc = hm[start : start + chunk_rows], targets[start : start + chunk_rows]
                logits = chunk[: len(tc)]
                if mm == torch.float32:
                    torch.mm(hc, w.t(), out=logits)
                else:
                    logits.copy_(hc @ w.t())
                picked = logits.gather(1, tc[:, None]).squeeze(1)
                top = logits.amax(dim=-1, keepdim=True)
                exp = logits.sub_(top).exp_()  # exp(logits - max), in the logits' memory
                sums = exp.sum(dim=-1)
                loss += (sums.log() + top.squeeze(1) - picked).sum()  # logsumexp - the target's logit
                if not (need_h or need_w):
                    continue
                # The gradient of the mean loss: (softmax - one-hot) / n.
                g = exp.mul_((1.0 / (sums * n))[:, None])
                g[torch.arange(len(tc), device=g.device), tc] -= 1.0 / n
                g = g.to(mm)
                if need_h:
                    torch.mm(g, w, out=grad_h[start : start + chunk_rows])
                if need_w:
                    if mm == torch.float32:
                        grad_w.addmm_(g.t(), hc)
                    else:  # addmm_ cannot add a bf16 product into fp32
                        grad_w += g.t() @ hc
        # Kept on ctx rather than saved: they are not inputs or outputs, and backward hands
        # over its only reference, so the [vocab, n_embd] gradient becomes weight.grad as it is.
        ctx.grads = (grad_h.to(h.dtype) if need_h else None, grad_w.to(weight.dtype) if need_w else None)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        return tuple(g.mul_(grad_loss) if g is not None else None for g in grads) + (None, None)
