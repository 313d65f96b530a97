"""``GatedSparseFFN``: a SwiGLU FFN split into neuron blocks, of which a router keeps a chosen
ratio per token (:func:`deepseek_kernels.gated_sparse_ffn`). State-dict keys are those of a
Llama-style MLP (``gate_proj``, ``up_proj``, ``down_proj``) plus ``router.weight`` (and
``selection_bias`` with ``balance="bias"``), so :meth:`GatedSparseFFN.from_dense` can replace one."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_kernels.ops.sparse_ffn import SparseRouting, check_gate_weighting, gated_sparse_ffn
from deepseek_kernels.reference.sparse_ffn import n_active, sparse_ffn_blocks_ref, swiglu_ffn_ref

BALANCES = ("bias", "aux", None)


@dataclass
class SparsityReport:
    """Output error of a sparse FFN against its dense self, per active ratio.

    ``rows``: dicts with ``ratio``, ``active_blocks`` (per token, shared included), ``rel_error``
    (``||sparse - dense|| / ||dense||`` with the router's choice) and ``oracle_rel_error`` (the same
    with the blocks of largest output norm: the best any router could do at that ratio)."""

    rows: list[dict] = field(default_factory=list)
    tokens: int = 0

    def __str__(self) -> str:
        lines = [f"sparse FFN output error vs dense ({self.tokens} tokens)",
                 f"  {'ratio':>6} {'blocks':>7} {'router':>10} {'oracle':>10}"]
        for r in self.rows:
            lines.append(f"  {r['ratio']:>6.3f} {r['active_blocks']:>7d} {r['rel_error']:>10.4f} "
                         f"{r['oracle_rel_error']:>10.4f}")
        return "\n".join(lines)


class GatedSparseFFN(nn.Module):
    """Routed neuron-block SwiGLU FFN (fine-grained MoE at neuron-block granularity).

    Args:
        d_model, d_ff: sizes; ``d_ff`` must be divisible by ``n_blocks``.
        n_blocks: neuron blocks (of ``d_ff / n_blocks`` neurons each); the first ``shared_blocks``
            are always active, the other ``n_routed = n_blocks - shared_blocks`` are routed.
        active_ratio: fraction of all blocks a token runs, ``k = n_active(ratio, n_blocks)``
            (shared included); change it at run time with :meth:`set_active_ratio`.
        gate: ``"sigmoid"`` or ``"softmax"`` of the router logits ``x . router.weight^T``.
        weighting: ``"gate"`` (chosen blocks scaled by their gate, normalised over the chosen
            blocks; the router learns through it) or ``"none"`` (weight 1: pure activation sparsity).
        balance: ``"bias"`` (DeepSeek-V3 auxiliary-loss-free: a per-block bias added for selection
            only; call :meth:`update_bias` after each optimizer step), ``"aux"`` (the standard
            load-balancing loss, left in :attr:`aux_loss` after each training forward; add it to
            the loss) or ``None``.
        bias_update_rate: the bias step ``u`` of ``bias += u * sign(mean_load - load)``.
        aux_loss_coef: ``alpha`` of ``aux_loss = alpha * sum_i f_i * P_i`` with ``f_i`` the share of
            routed slots given to block ``i`` times ``n_routed`` and ``P_i`` its mean normalised gate.

    Observed after each forward: :attr:`last_load` (fraction of tokens routed to each routed
    block), :attr:`activation_ratio` (active blocks per token / n_blocks, shared included), and
    in training :attr:`load` (routed-token counts accumulated since the last :meth:`update_bias`).
    """

    def __init__(self, d_model: int, d_ff: int, *, n_blocks: int = 64, active_ratio: float = 0.3,
                 shared_blocks: int = 0, gate: str = "sigmoid", weighting: str = "gate", balance: str | None = "bias",
                 bias_update_rate: float = 1e-3, aux_loss_coef: float = 1e-2,
                 device=None, dtype=None):
        super().__init__()
        name = "GatedSparseFFN"
        if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 1:
            raise ValueError(f"{name}: n_blocks must be an int >= 1, got {n_blocks!r}")
        if d_ff % n_blocks:
            raise ValueError(f"{name}: d_ff ({d_ff}) must be divisible by n_blocks ({n_blocks})")
        if isinstance(shared_blocks, bool) or not isinstance(shared_blocks, int) or not 0 <= shared_blocks < n_blocks:
            raise ValueError(f"{name}: shared_blocks must be an int in [0, n_blocks) = [0, {n_blocks}), "
                             f"got {shared_blocks!r}")
        check_gate_weighting(name, gate, weighting)
        if balance not in BALANCES:
            raise ValueError(f"{name}: balance must be one of {BALANCES}, got {balance!r}")
        self.d_model, self.d_ff, self.n_blocks, self.shared_blocks = d_model, d_ff, n_blocks, shared_blocks
        self.n_routed = n_blocks - shared_blocks
        self.gate, self.weighting, self.balance = gate, weighting, balance
        self.bias_update_rate, self.aux_loss_coef = bias_update_rate, aux_loss_coef
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(d_model, d_ff, **kw)
        self.up_proj = nn.Linear(d_model, d_ff, **kw)
        self.down_proj = nn.Linear(d_ff, d_model, **kw)
        self.router = nn.Linear(d_model, self.n_routed, **kw)
        bias = torch.zeros(self.n_routed, dtype=torch.float32, device=device) if balance == "bias" else None
        self.register_buffer("selection_bias", bias)
        self.register_buffer("load", torch.zeros(self.n_routed, dtype=torch.float32, device=device), persistent=False)
        self.last_load: torch.Tensor | None = None
        self.activation_ratio: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None
        self.threshold: float | None = None
        self.set_active_ratio(active_ratio)

    # ---- run-time knobs ---------------------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self.d_ff // self.n_blocks

    @property
    def k(self) -> int:
        """Routed blocks per token (the cap in threshold mode)."""
        return n_active(self.active_ratio, self.n_blocks) - self.shared_blocks

    def set_active_ratio(self, ratio: float) -> None:
        """Run ``n_active(ratio, n_blocks)`` blocks per token from now on (threshold mode off)."""
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"GatedSparseFFN.set_active_ratio: ratio must be a number in (0, 1], got {ratio!r}")
        if n_active(ratio, self.n_blocks) < self.shared_blocks:
            raise ValueError(f"GatedSparseFFN.set_active_ratio: ratio {ratio} keeps {n_active(ratio, self.n_blocks)} "
                             f"of {self.n_blocks} blocks, fewer than the {self.shared_blocks} shared blocks")
        self.active_ratio = float(ratio)
        self.threshold = None

    def set_threshold(self, threshold: float | None, *, max_ratio: float | None = None) -> None:
        """Keep only routed blocks whose gate exceeds ``threshold``, at most ``max_ratio``'s worth
        (default: the current active ratio). ``None`` switches threshold mode off."""
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not 0 <= threshold < 1):
            raise ValueError(f"GatedSparseFFN.set_threshold: threshold must be None or a number in [0, 1), "
                             f"got {threshold!r}")
        if max_ratio is not None:
            self.set_active_ratio(max_ratio)
        self.threshold = None if threshold is None else float(threshold)

    # ---- forward and balance ----------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, routing = gated_sparse_ffn(
            x, self.router.weight, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight,
            active_ratio=self.active_ratio, shared_blocks=self.shared_blocks, gate=self.gate,
            weighting=self.weighting, bias=self.selection_bias, threshold=self.threshold, return_routing=True)
        counts = self._observe(routing)
        self.aux_loss = None
        if self.balance == "aux" and self.training and routing.probs is not None:
            self.aux_loss = self._aux_loss(routing, counts)
        return out

    @torch.no_grad()
    def _observe(self, r: SparseRouting) -> torch.Tensor:
        T = r.idx.shape[0]
        valid = r.idx >= 0
        counts = torch.zeros(self.n_routed, dtype=torch.float32, device=r.idx.device)
        counts.scatter_add_(0, r.idx.long().clamp_min(0).reshape(-1), valid.reshape(-1).float())
        self.last_load = counts / max(T, 1)
        self.activation_ratio = (valid.sum() + self.shared_blocks * T) / max(T * self.n_blocks, 1)
        if self.training:
            self.load += counts
        return counts

    def _aux_loss(self, r: SparseRouting, counts: torch.Tensor) -> torch.Tensor:
        T = r.probs.shape[0]
        p = r.probs / r.probs.sum(-1, keepdim=True).clamp_min(1e-20)  # softmax probs already sum to 1
        f = counts * (self.n_routed / max(r.k * T, 1))
        return self.aux_loss_coef * (f * p.mean(0)).sum()

    @torch.no_grad()
    def update_bias(self) -> None:
        """Auxiliary-loss-free balancing step (DeepSeek-V3): ``bias += u * sign(mean(load) - load)``
        with the load observed since the last call; then the load counter restarts."""
        if self.balance != "bias":
            raise RuntimeError(f"GatedSparseFFN.update_bias: needs balance='bias', this module has {self.balance!r}")
        if self.load.sum() > 0:
            self.selection_bias += self.bias_update_rate * torch.sign(self.load.mean() - self.load)
        self.load.zero_()

    # ---- conversion from a dense MLP ----------------------------------------------------------------

    @torch.no_grad()
    def block_importance(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, n_blocks]``: the norm of each block's contribution ``h_b . W_down[:, b]^T`` to the
        dense output, per token (what the router of :meth:`from_dense` learns to predict)."""
        x2 = x.reshape(-1, self.d_model).float()
        h = F.silu(x2 @ self.gate_proj.weight.float().t()) * (x2 @ self.up_proj.weight.float().t())
        wd = self.down_proj.weight.float()
        bs = self.block_size
        return torch.stack([(h[:, b * bs:(b + 1) * bs] @ wd[:, b * bs:(b + 1) * bs].t()).norm(dim=-1)
                            for b in range(self.n_blocks)], dim=1)

    @classmethod
    @torch.no_grad()
    def from_dense(cls, mlp: nn.Module, *, n_blocks: int = 64, calibration, active_ratio: float = 0.5,
                   shared_blocks: int = 0, ridge: float = 1e-3,
                   report_ratios: tuple[float, ...] | None = (1.0, 0.5, 0.3, 0.15)) -> "GatedSparseFFN":
        """Converts a Llama-style MLP (``gate_proj``, ``up_proj``, ``down_proj`` without bias,
        ``down(silu(gate(x)) * up(x))``) into a sparse FFN with the same weights, sliced into
        ``n_blocks`` blocks, ``weighting="none"``, ``balance=None``, sigmoid gate.

        The router is fitted on ``calibration`` (an iterable of ``[..., d_model]`` inputs) by ridge
        regression of ``log`` block importance (:meth:`block_importance`, centred per token) on x:
        ``W = (X^T X + ridge * mean(diag) * I)^-1 X^T Z``; its top-k then predicts the blocks that
        matter. ``conversion_report`` holds a :class:`SparsityReport` on the calibration data
        (in-sample; call :meth:`error_report` on held-out data for an honest curve)."""
        name = "GatedSparseFFN.from_dense"
        projs = {}
        for attr in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(mlp, attr, None)
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"{name}: mlp.{attr} must be an nn.Linear (Llama-style MLP), got {type(lin).__name__}")
            if lin.bias is not None:
                raise ValueError(f"{name}: mlp.{attr} has a bias; only bias-free MLPs are supported")
            projs[attr] = lin.weight
        d_ff, d_model = projs["gate_proj"].shape
        if projs["up_proj"].shape != (d_ff, d_model) or projs["down_proj"].shape != (d_model, d_ff):
            raise ValueError(f"{name}: inconsistent shapes gate {tuple(projs['gate_proj'].shape)}, up "
                             f"{tuple(projs['up_proj'].shape)}, down {tuple(projs['down_proj'].shape)}")
        w = projs["gate_proj"]
        m = cls(d_model, d_ff, n_blocks=n_blocks, active_ratio=active_ratio, shared_blocks=shared_blocks,
                gate="sigmoid", weighting="none", balance=None, device=w.device, dtype=w.dtype)
        for attr, weight in projs.items():
            getattr(m, attr).weight.copy_(weight)
        batches = [b.reshape(-1, d_model) for b in calibration]
        if not batches or sum(b.shape[0] for b in batches) == 0:
            raise ValueError(f"{name}: calibration must hold at least one token")
        xtx = torch.zeros(d_model, d_model, dtype=torch.float64, device=w.device)
        xtz = torch.zeros(d_model, m.n_routed, dtype=torch.float64, device=w.device)
        for xb in batches:
            z = m.block_importance(xb)[:, shared_blocks:].double().clamp_min(1e-12).log()
            z = z - z.mean(-1, keepdim=True)  # the ranking per token is what matters
            xd = xb.double()
            xtx += xd.t() @ xd
            xtz += xd.t() @ z
        reg = ridge * xtx.diagonal().mean().clamp_min(1e-12)
        router = torch.linalg.solve(xtx + reg * torch.eye(d_model, dtype=torch.float64, device=w.device), xtz)
        m.router.weight.copy_(router.t().to(m.router.weight.dtype))
        m.conversion_report = m.error_report(batches, report_ratios) if report_ratios else None
        return m

    @torch.no_grad()
    def error_report(self, batches, ratios=(1.0, 0.5, 0.3, 0.15)) -> SparsityReport:
        """How the output error against the dense FFN (every block at weight 1, fp32) grows as the
        active ratio falls, with this module's router, weighting and bias; the oracle row picks the
        blocks of largest output norm at weight 1. The module's ratio and threshold are restored."""
        saved = (self.active_ratio, self.threshold)
        weights = [p.weight for p in (self.gate_proj, self.up_proj, self.down_proj)]
        report = SparsityReport()
        batches = [b.reshape(-1, self.d_model) for b in batches]
        wf = [w.float() for w in weights]
        dense = [swiglu_ffn_ref(b.float(), *wf) for b in batches]
        report.tokens = sum(b.shape[0] for b in batches)
        try:
            for ratio in ratios:
                self.set_active_ratio(ratio)
                k_total = n_active(ratio, self.n_blocks)
                err = ref_norm = oracle_err = 0.0
                for xb, yd in zip(batches, dense):
                    ys = gated_sparse_ffn(xb, self.router.weight, *weights, active_ratio=ratio,
                                          shared_blocks=self.shared_blocks, gate=self.gate,
                                          weighting=self.weighting, bias=self.selection_bias).float()
                    imp = self.block_importance(xb)[:, self.shared_blocks:]
                    top = torch.sort(imp, dim=-1, descending=True, stable=True).indices[:, :self.k]
                    yo = sparse_ffn_blocks_ref(xb, *weights, top.to(torch.int32), torch.ones_like(top, dtype=torch.float32),
                                               n_blocks=self.n_blocks, shared_blocks=self.shared_blocks).float()
                    err += (ys - yd).pow(2).sum().item()
                    oracle_err += (yo - yd).pow(2).sum().item()
                    ref_norm += yd.pow(2).sum().item()
                report.rows.append({"ratio": ratio, "active_blocks": k_total,
                                    "rel_error": (err / max(ref_norm, 1e-30)) ** 0.5,
                                    "oracle_rel_error": (oracle_err / max(ref_norm, 1e-30)) ** 0.5})
        finally:
            self.active_ratio, self.threshold = saved
        return report

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, n_blocks={self.n_blocks}, shared={self.shared_blocks}, "
                f"active_ratio={self.active_ratio}, threshold={self.threshold}, gate={self.gate}, "
                f"weighting={self.weighting}, balance={self.balance}")
