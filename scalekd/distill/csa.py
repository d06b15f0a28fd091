"""The Cross-Scale Assistant (ScaleKD, section 3.2, equations 3-6).

Per FPN level, queries come from the student's map F_S; keys and values come from the teacher's map
F_T (2x larger), aggregated by MSC at one pooling rate per group of heads (the Shunted Transformer's
pattern), with a depth-wise 3x3 conv added to V (eq. 5). The heads' outputs are concatenated,
projected and added back onto F_S; the result goes through the *student's* detection head.
Equation 6's parenthesis is a typo: h_i = softmax(Q_i K_i^T / sqrt(d_h)) V_i.
Memory grows with student tokens x pooled teacher tokens, never with teacher tokens squared.

Departs from the paper (which is silent on it): with ``positional="sine"`` (default) a 2D sine encoding
of each token's position in image coordinates is added to Q and K, as DETR does for its cross-attention.
Student and teacher are different networks, so without it a student query can find the teacher tokens
at its own location only through learned content similarity. ``positional="none"`` is the paper's text;
at our benchmark's scale the two measured the same (docs/results.md: the ``no_positional`` ablation).

Also departs from the paper (our recipe; ``distill.recipe=paper`` turns both off): with
``locality="distance_bias"`` each head adds ``-exp(s_h) * d^2`` to its attention logits, d the distance
between the query's cell and the key's cell in query cells (s_h learned, starting at 0: the attention
starts on the query's own footprint and its neighbours instead of near-uniform over the image). Position
codes alone reach the logits only through random projections and take DETR's long schedules to localise;
a near-uniform attention returns a per-image summary, for which the teacher's tokens are no better than
the student's. With ``zero_init_output`` the output projection starts at zero, so the assistant starts as
exactly the student and the attention's contribution grows from there.

A third departure (``distill.csa.starts_as``, our default where it applies): the attention's output may be added
onto the teacher's scale-aligned map instead of the student's (``residual_maps``), read by a copy of the teacher's
head. With the zero-initialised projection the assistant then starts as exactly the 2x teacher's predictions on
the student's anchors and learns from the ground truth what to change given the student's queries. On our
benchmark an assistant that started as the student stayed a weaker detector than a strong teacher, and Chen et
al.'s plain output distillation from that teacher beat ScaleKD; with another (weaker) teacher, starting from the
teacher was worth +4 AP_S over starting from the student and beat OD by +5.7 (docs/results.md). Measured on that
run: the trained assistant ignored its queries (shuffling the student's cells left its AP unchanged), so it acts as
the teacher's head training on the ground truth, not as a cross-scale attention; an open problem. On real aerial
tiles (KIT AIS) whose training set the teacher had learnt, that training only sharpened the teacher's scores and
the student kept less of the teacher's gain the more the assistant trained (``distill.csa.head_lr=0`` trains the
attention alone; docs/results.md).
"""

from __future__ import annotations

import functools
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@functools.lru_cache(maxsize=64)
def sine_position_encoding(h: int, w: int, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[h*w, dim] 2D sine encoding of cell centres in [0, 1] image coordinates (DETR's, normalised).

    Normalised coordinates make a student cell and the teacher cells covering the same image region
    (on a grid 2x finer, then pooled) get nearly the same code. Cached: the same few grids recur every
    iteration (one per FPN level and pooling rate), and callers only read the result."""
    quarter = dim // 4
    freqs = torch.pow(torch.tensor(200.0, device=device), -torch.arange(quarter, device=device) / max(quarter, 1))
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 * torch.pi
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 * torch.pi
    ang_y, ang_x = ys[:, None] * freqs * 8, xs[:, None] * freqs * 8  # [h, q], [w, q]
    enc_y = torch.cat([ang_y.sin(), ang_y.cos()], dim=1)[:, None, :].expand(h, w, 2 * quarter)
    enc_x = torch.cat([ang_x.sin(), ang_x.cos()], dim=1)[None, :, :].expand(h, w, 2 * quarter)
    enc = torch.cat([enc_y, enc_x], dim=-1).reshape(h * w, 4 * quarter)
    if enc.shape[1] < dim:
        enc = torch.cat([enc, enc.new_zeros(h * w, dim - enc.shape[1])], dim=1)
    return enc.to(dtype)


@functools.lru_cache(maxsize=64)
def squared_cell_distance(h: int, w: int, gh: int, gw: int, device: torch.device) -> Tensor:
    """[h*w, gh*gw] squared distance between the centres of a query grid's cells and a key grid's cells
    covering the same image, in query cells. Cached: callers only read it."""
    qy = (torch.arange(h, device=device) + 0.5) / h
    qx = (torch.arange(w, device=device) + 0.5) / w
    ky = (torch.arange(gh, device=device) + 0.5) / gh
    kx = (torch.arange(gw, device=device) + 0.5) / gw
    dy = ((qy[:, None] - ky[None, :]) * h) ** 2  # [h, gh]
    dx = ((qx[:, None] - kx[None, :]) * w) ** 2  # [w, gw]
    return (dy[:, None, :, None] + dx[None, :, None, :]).reshape(h * w, gh * gw)


class MultiScaleAggregation(nn.Module):
    """MSC(F, r): area-pool by r, then a per-token MLP (Linear, LayerNorm, GELU)."""

    def __init__(self, dim: int, rate: int):
        super().__init__()
        self.rate = rate
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.GELU())

    def forward(self, teacher_map: Tensor) -> tuple[Tensor, int, int]:
        """[N, C, H, W] -> tokens [N, L, C] with L = ceil(H/r) * ceil(W/r), and that grid's (h, w)."""
        if self.rate > 1:
            teacher_map = F.avg_pool2d(teacher_map, self.rate, self.rate, ceil_mode=True)
        _n, _c, h, w = teacher_map.shape
        return self.mlp(teacher_map.flatten(2).transpose(1, 2)), h, w


class CrossScaleAttention(nn.Module):
    """forward(student_map [N, C, h, w], teacher_map [N, C, H, W]) -> [N, C, h, w]."""

    def __init__(self, dim: int, heads: int = 8, rates: tuple[int, ...] = (2, 4), attention: str = "multiscale",
                 positional: str = "sine", locality: str = "none", zero_init_output: bool = False):
        super().__init__()
        self.dim, self.heads, self.attention, self.positional = dim, heads, attention, positional
        self.head_dim = dim // heads
        self.rates = tuple(rates) if attention == "multiscale" else (1,)
        self.heads_per_group = heads // len(self.rates)
        group_dim = self.heads_per_group * self.head_dim
        self.norm_q = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        if attention == "multiscale":
            self.aggregate = nn.ModuleList(MultiScaleAggregation(dim, r) for r in self.rates)
            # Eq. 5: V_i = V_i + P(V_i), P a depth-wise 3x3 conv on the pooled grid.
            self.dwconv: nn.ModuleList | None = nn.ModuleList(
                nn.Conv2d(group_dim, group_dim, 3, padding=1, groups=group_dim) for _ in self.rates)
        else:  # standard cross-attention over every teacher token (Table 6's "plain")
            self.aggregate = nn.ModuleList([nn.LayerNorm(dim)])
            self.dwconv = None
        self.kv = nn.ModuleList(nn.Linear(dim, 2 * group_dim) for _ in self.rates)
        self.proj = nn.Linear(dim, dim)
        if zero_init_output:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        # log of each head's distance penalty (see the module docstring); None: no bias (the paper).
        self.log_locality = nn.Parameter(torch.zeros(heads)) if locality == "distance_bias" else None

    def distance_bias(self, group: int, h: int, w: int, gh: int, gw: int, dtype: torch.dtype) -> Tensor | None:
        """[Hg, h*w, gh*gw] additive attention logits of one head group, or None without locality."""
        if self.log_locality is None:
            return None
        heads = slice(group * self.heads_per_group, (group + 1) * self.heads_per_group)
        distance = squared_cell_distance(h, w, gh, gw, self.log_locality.device)
        return (-self.log_locality[heads].exp()[:, None, None] * distance).to(dtype)

    def forward(self, student_map: Tensor, teacher_map: Tensor, residual_map: Tensor | None = None) -> Tensor:
        """The attention's projected output added onto ``residual_map`` (default: the student's map, eq. 6)."""
        n, c, h, w = student_map.shape
        tokens = student_map.flatten(2).transpose(1, 2)  # [N, hw, C]
        outputs = [F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [N, Hg, hw, d]
                   for q, k, v, bias, _ in self.head_groups(tokens, h, w, teacher_map)]
        out = self.proj(torch.cat(outputs, dim=1).transpose(1, 2).reshape(n, h * w, c))
        out = out.transpose(1, 2).reshape(n, c, h, w)
        return (student_map if residual_map is None else residual_map) + out

    @torch.no_grad()
    def attention_weights(self, student_map: Tensor, teacher_map: Tensor) -> list[tuple[Tensor, tuple[int, int]]]:
        """Per head group: its attention [N, Hg, hw, L] and its key grid (gh, gw); a diagnostic, not a forward."""
        h, w = student_map.shape[-2:]
        tokens = student_map.flatten(2).transpose(1, 2)
        weights = []
        for q, k, _, bias, grid in self.head_groups(tokens, h, w, teacher_map):
            logits = q @ k.transpose(-2, -1) / self.head_dim**0.5
            weights.append(((logits if bias is None else logits + bias).softmax(dim=-1), grid))
        return weights

    def head_groups(self, tokens: Tensor, h: int, w: int, teacher_map: Tensor):
        """Yields (q [N, Hg, hw, d], k and v [N, Hg, L, d], additive bias or None, key grid) per head group."""
        n, _, c = tokens.shape
        queries = self.norm_q(tokens)
        if self.positional == "sine":
            queries = queries + sine_position_encoding(h, w, c, tokens.device, queries.dtype)
        q = self.q(queries).view(n, h * w, self.heads, self.head_dim).transpose(1, 2)
        for g in range(len(self.rates)):
            if self.dwconv is not None:
                kv_tokens, gh, gw = self.aggregate[g](teacher_map)
            else:
                gh, gw = teacher_map.shape[-2:]
                kv_tokens = self.aggregate[g](teacher_map.flatten(2).transpose(1, 2))
            length = kv_tokens.shape[1]
            if self.positional == "sine":
                # Position goes into K only (not V), as in DETR; one Linear holds both projections.
                kv = cast(nn.Linear, self.kv[g])
                weight_k, weight_v = kv.weight.chunk(2, dim=0)
                bias_k, bias_v = kv.bias.chunk(2, dim=0)
                keys_in = kv_tokens + sine_position_encoding(gh, gw, c, kv_tokens.device, kv_tokens.dtype)
                k, v = F.linear(keys_in, weight_k, bias_k), F.linear(kv_tokens, weight_v, bias_v)
            else:
                k, v = self.kv[g](kv_tokens).chunk(2, dim=-1)  # [N, L, Cg] each
            if self.dwconv is not None:
                v_map = v.transpose(1, 2).reshape(n, -1, gh, gw)
                v = v + self.dwconv[g](v_map).flatten(2).transpose(1, 2)
            k = k.view(n, length, self.heads_per_group, self.head_dim).transpose(1, 2)
            v = v.view(n, length, self.heads_per_group, self.head_dim).transpose(1, 2)
            q_g = q[:, g * self.heads_per_group:(g + 1) * self.heads_per_group]
            yield q_g, k, v, self.distance_bias(g, h, w, gh, gw, q_g.dtype), (gh, gw)


class CrossScaleAssistant(nn.Module):
    """One cross-scale attention shared by every FPN level, like the detection head it feeds."""

    def __init__(self, dim: int, heads: int = 8, rates: tuple[int, ...] = (2, 4), attention: str = "multiscale",
                 positional: str = "sine", locality: str = "none", zero_init_output: bool = False):
        super().__init__()
        self.attention = CrossScaleAttention(dim, heads, rates, attention, positional, locality, zero_init_output)

    def forward(self, student_maps: list[Tensor], teacher_maps: list[Tensor],
                residual_maps: list[Tensor] | None = None) -> list[Tensor]:
        """Per level: student [N, C, h, w] and the teacher's paired map [N, C, 2h, 2w] (same level) or
        [N, C, h, w] (scale-aligned pairing) -> assistant map [N, C, h, w], the attention's output added onto the
        student's map (the paper) or onto ``residual_maps`` (``csa.starts_as=teacher``)."""
        residuals = residual_maps if residual_maps is not None else [None] * len(student_maps)
        return [self.attention(s, t, r) for s, t, r in zip(student_maps, teacher_maps, residuals)]
