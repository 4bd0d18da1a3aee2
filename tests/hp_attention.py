"""High-precision reference for one multi-head attention over width-1 tokens (eqs 8-11).

The textbook formula  y = concat_h softmax(Q_h K_h^T / sqrt(d_h)) V_h  W^out + b^out  with
Q = x_q W^Q + b^Q, K = x_kv W^K + b^K, V = x_kv W^V + b^V  (d = 1), and its vector-Jacobian
product for a given upstream gradient g, evaluated in ``mpmath`` with ``dps`` decimal digits
(default 40): far beyond float64, so its rounding is negligible at the 1e-12 level and it is
the "truth" against which float64 implementations are judged.  The backward is the textbook
one, written out by hand (no cancellation matters at 40 digits):

    dW^out = g^T O,  db^out = sum g,  dO = g W^out,  dP_h = dO_h V_h^T,  dV_h = P_h^T dO_h,
    dS_h = P_h * (dP_h - rowsum(dP_h * P_h)),  dQ_h = dS_h K_h / sqrt(d_h),  dK_h = dS_h^T Q_h / sqrt(d_h),
    dW^Q = dQ^T x_q,  db^Q = sum_j dQ_j  (same for K, V with x_kv),  dx_q = dQ W^Q,  dx_kv = dK W^K + dV W^V.

Used by tests/test_moments.py and benchmarks/bench_train.py (reduced sizes: O(H n^2 d_h)
multi-precision operations).
"""

from __future__ import annotations

import mpmath
import numpy as np

PARAMS = ("q.weight", "q.bias", "k.weight", "k.bias", "v.weight", "v.bias", "out.weight", "out.bias")


def _mp(a) -> np.ndarray:
    """float64 array -> object array of mpf (exact conversion)."""
    a = np.asarray(a, dtype=np.float64)
    return np.vectorize(mpmath.mpf, otypes=[object])(a) if a.size else a.astype(object)


def mha_vjp(xq, xkv, params: dict, g, heads: int, dps: int = 40) -> dict:
    """Reference output and gradients (as float64 numpy arrays, rounded once).

    xq, xkv: (n,) token values of one sample; params: float64 arrays keyed by PARAMS
    (``q.weight`` (d_model, 1) etc., ``out.weight`` (1, d_model), ``out.bias`` (1,)); g: (n,).
    Returns {"y", "xq", "xkv", *PARAMS} (gradients of <g, y>; key bias included: exactly 0).
    """
    with mpmath.workdps(dps):
        xq, xkv, g = _mp(xq), _mp(xkv), _mp(g)
        p = {k: _mp(v) for k, v in params.items()}
        wq, bq = p["q.weight"][:, 0], p["q.bias"]
        wk, bk = p["k.weight"][:, 0], p["k.bias"]
        wv, bv = p["v.weight"][:, 0], p["v.bias"]
        wo, bo = p["out.weight"][0], p["out.bias"][0]
        dm = wq.shape[0]
        dh = dm // heads
        inv = 1 / mpmath.sqrt(dh)
        q = np.outer(xq, wq) + bq                     # (n, dm)
        k = np.outer(xkv, wk) + bk
        v = np.outer(xkv, wv) + bv
        exp = np.vectorize(mpmath.exp, otypes=[object])
        o = np.empty_like(q)
        probs = []
        for h in range(heads):
            sl = slice(h * dh, (h + 1) * dh)
            s = q[:, sl].dot(k[:, sl].T) * inv          # (n, n)
            s = s - s.max(axis=1)[:, None]
            e = exp(s)
            pr = e / e.sum(axis=1)[:, None]
            probs.append(pr)
            o[:, sl] = pr.dot(v[:, sl])
        y = o.dot(wo) + bo                              # (n,)
        d_o = np.outer(g, wo)                           # (n, dm)
        dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
        for h in range(heads):
            sl = slice(h * dh, (h + 1) * dh)
            pr = probs[h]
            dp = d_o[:, sl].dot(v[:, sl].T)
            dv[:, sl] = pr.T.dot(d_o[:, sl])
            ds = pr * (dp - (dp * pr).sum(axis=1)[:, None])
            dq[:, sl] = ds.dot(k[:, sl]) * inv
            dk[:, sl] = ds.T.dot(q[:, sl]) * inv
        out = {
            "y": y,
            "out.weight": g.dot(o)[None, :], "out.bias": np.array([g.sum()], dtype=object),
            "q.weight": dq.T.dot(xq)[:, None], "q.bias": dq.sum(axis=0),
            "k.weight": dk.T.dot(xkv)[:, None], "k.bias": dk.sum(axis=0),
            "v.weight": dv.T.dot(xkv)[:, None], "v.bias": dv.sum(axis=0),
            "xq": dq.dot(wq), "xkv": dk.dot(wk) + dv.dot(wv),
        }
        return {name: np.array([float(x) for x in a.ravel()]).reshape(a.shape) for name, a in out.items()}


# SIM's four attentions (sgmft.models.sgmft.SIM.forward, eqs 8-11): stage name, query input,
# key/value input, query projection, key/value projection, output projection.
SIM_ATTENTIONS = (
    ("sa_i", "xi", "xi", "proj_i", "proj_i", "out_sa_i"),
    ("ca_i", "xt", "xi", "proj_t", "proj_i", "out_ca_i"),
    ("sa_t", "xt", "xt", "proj_t", "proj_t", "out_sa_t"),
    ("ca_t", "xi", "xt", "proj_i", "proj_t", "out_ca_t"),
)


def sim_attention_reference(model, text, image, y, dps: int = 40) -> dict:
    """High-precision gradients of the cross-entropy w.r.t. every SIM attention parameter
    (``sim.proj_*``, ``sim.out_*``) of a float64 width-1 SG-MFT ``model``.

    The upstream gradients g = dL/d(attention output) come from float64 autograd through
    ``model`` (the part downstream of the attentions agrees across implementations to
    ~1e-14); each attention's vector-Jacobian product, where the float64 implementations
    differ, is then evaluated by :func:`mha_vjp` in ``dps``-digit arithmetic per sample and
    summed into the parameters it belongs to.  Returns {parameter name: float64 tensor}.
    """
    import torch

    stages: dict = {}
    model.zero_grad(set_to_none=True)
    out = model(text, image, stages=stages)
    for name, *_ in SIM_ATTENTIONS:
        stages[name].retain_grad()
    torch.nn.functional.cross_entropy(out.logits, y).backward()
    sim = model.sim
    ref: dict = {}

    def add(key, value):
        value = torch.as_tensor(value, dtype=torch.float64)
        ref[key] = ref[key] + value if key in ref else value

    for name, xq_name, xkv_name, pq, pkv, po in SIM_ATTENTIONS:
        mq, mkv, mo = getattr(sim, pq), getattr(sim, pkv), getattr(sim, po)
        params = {"q.weight": mq.q.weight, "q.bias": mq.q.bias, "k.weight": mkv.k.weight,
                  "k.bias": mkv.k.bias, "v.weight": mkv.v.weight, "v.bias": mkv.v.bias,
                  "out.weight": mo.weight, "out.bias": mo.bias}
        params = {k: v.detach().double().numpy() for k, v in params.items()}
        g = stages[name].grad
        for b in range(g.shape[0]):
            r = mha_vjp(stages[xq_name][b, :, 0].detach().numpy(), stages[xkv_name][b, :, 0].detach().numpy(),
                        params, g[b, :, 0].numpy(), sim.heads, dps)
            for k in ("q.weight", "q.bias"):
                add(f"sim.{pq}.{k}", r[k])
            for k in ("k.weight", "k.bias", "v.weight", "v.bias"):
                add(f"sim.{pkv}.{k}", r[k])
            add(f"sim.{po}.weight", r["out.weight"])
            add(f"sim.{po}.bias", r["out.bias"])
    model.zero_grad(set_to_none=True)
    return ref
