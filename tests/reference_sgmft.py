"""An independent float64 reference forward of SG-MFT, written from the paper's equations.

It is the oracle of ``tests/test_equations.py`` and of the mutation check
(``tests/mutation/check_mutants.py``).  It shares no code with ``sgmft.models``: it is
plain NumPy (float64) and reads the model's parameters only by name from a
``state_dict`` (the mapping is :data:`NAMES` below, the one place to update if modules
are renamed).  Every array it reads is checked against the shape the equations imply,
and :func:`reference_forward` fails if the state_dict holds a parameter it did not use
(other than the ones listed in :data:`UNUSED`), so a parameter the model adds cannot go
unchecked.

Conventions fixed here (the paper leaves them open; SPEC.md "The token view"):

* A D-vector is n tokens of width d = D / n, row-major: token j is elements j*d .. j*d+d-1.
* A linear map stored as torch's ``nn.Linear`` is ``y = x W^T + b`` (weight (out, in)).
* Multi-head attention splits d_model into h contiguous blocks of width d_h = d_model / h.
* LayerNorm: biased variance, eps = 1e-5, affine weight and bias, over the last axis
  (``token`` norm) or the last two (``vector`` norm: the whole n x d block).
* ``norm_mode: auto`` is ``vector`` when d < 16, else ``token``; ``input_scale: sqrt_dim``
  is sqrt(D).

Stages returned (all (B, n, d) unless said): xt, xi (inputs as tokens), q_t k_t v_t q_i
k_i v_i (eqs 6-7, (B, n, d_model)), p_m (eqs 1, 3; (B, n)), p_e (eqs 2, 4, 5; (B, n, n),
rows = the similarity-aware side's positions), sa_i ca_i x_image xc_i (eqs 8-13, image
side), sa_t ca_t x_text xc_t (the same, text side), x_inter (eq 14), ffn_t ffn_i (eq 15
and the ordinary FFN), fs_t fs_i (eq 16), ca1 ca2 (eq 17's two cross-attentions), fused
(M_fuse, (B, F)), logits (eq 18, (B, classes)).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# --------------------------------------------------------------------------------------
# state_dict name mapping: symbol in the paper -> parameter name in the model.
# "{side}" is "t" (text) or "i" (image).  Linear layers have ".weight" and ".bias".
NAMES = {
    "missing_text": "text_in.missing",          # learned placeholder for an absent text
    "missing_image": "image_in.missing",        # ... and image
    "W_Q": "sim.proj_{side}.q",                 # eqs 6 (t), 7 (i): W^Q_t, W^Q_i
    "W_K": "sim.proj_{side}.k",                 # W^K
    "W_V": "sim.proj_{side}.v",                 # W^V
    "W_s": "sim.out_sa_{side}",                 # eq 10: W^s (self-attention output)
    "W_c": "sim.out_ca_{side}",                 # eq 11: W^c (cross-attention output)
    "LN_att": "sim.norm_att_{side}.norm",       # eq 13: LayerNorm after interpolation
    "W1_sim": "sim.ffn_sim.w1",                 # eq 15: W_1, b_1
    "W3_sim": "sim.ffn_sim.w3",                 # eq 15: W_3 (no bias)
    "W2_sim": "sim.ffn_sim.w2",                 # eq 15: W_2, b_2
    "W1_plain": "sim.ffn_plain.w1",             # ordinary FFN (other side): W_1, b_1
    "W2_plain": "sim.ffn_plain.w2",             # W_2, b_2
    "LN_ffn": "sim.norm_ffn_{side}.norm",       # eq 16: LayerNorm after the FFN
    "CA1": "fusion.ca_text",                    # eq 17: CA(query F^S_text, key/value F^S_image)
    "CA2": "fusion.ca_image",                   # eq 17: CA(query F^S_image, key/value F^S_text)
    "CA_Q": "proj_q.q",                         #   ... its W^Q (under CA1 / CA2)
    "CA_K": "proj_kv.k",                        #   ... its W^K
    "CA_V": "proj_kv.v",                        #   ... its W^V
    "CA_out": "out",                            #   ... its output projection
    "MC": "classifier",                         # eq 18: linear layers "<MC>.<...>.<idx>.weight",
}                                               #        applied in increasing idx order
# Parameters that exist but take no part in the equations: an SFM cross-attention builds a
# full W^Q, W^K, W^V set for its query side and for its key/value side, and uses only W^Q of
# the first and W^K, W^V of the second.
UNUSED = [f"{ca}.{p}.{w}.{t}" for ca in (NAMES["CA1"], NAMES["CA2"])
          for p, w in (("proj_q", "k"), ("proj_q", "v"), ("proj_kv", "q")) for t in ("weight", "bias")]

LN_EPS = 1e-5


# --------------------------------------------------------------------------------------
class _Params:
    """Reads float64 arrays from a state_dict by name, checking shapes, tracking use."""

    def __init__(self, state_dict):
        self.sd = {k: np.asarray(v.detach().cpu().double().numpy()) if hasattr(v, "detach") else np.asarray(v)
                   for k, v in state_dict.items()}
        self.used: set[str] = set()

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.sd:
            raise KeyError(f"reference: state_dict has no {name!r} (see NAMES in {__file__})")
        a = self.sd[name]
        if tuple(a.shape) != tuple(shape):
            raise AssertionError(f"reference: {name} has shape {tuple(a.shape)}, the equations need {tuple(shape)}")
        self.used.add(name)
        return a

    def linear(self, prefix: str, n_in: int, n_out: int, bias: bool = True):
        w = self.get(prefix + ".weight", (n_out, n_in))
        b = self.get(prefix + ".bias", (n_out,)) if bias else None
        if not bias and prefix + ".bias" in self.sd:
            raise AssertionError(f"reference: {prefix} must have no bias (eq 15 has only b_1, b_2)")
        return w, b

    def unused(self) -> list[str]:
        return sorted(set(self.sd) - self.used - set(UNUSED))


def _apply(lin, x):
    w, b = lin
    y = x @ w.T                                     # torch Linear: y = x W^T (+ b)
    return y if b is None else y + b


def softmax(s: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(s - s.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)  # biased variance, as LayerNorm
    return (x - mu) / np.sqrt(var + LN_EPS) * weight + bias


def mha(xq, xkv, q_lin, k_lin, v_lin, out_lin, heads: int):
    """concat_h softmax(Q_h K_h^T / sqrt(d_h)) V_h W^out (eqs 8-11); xq (B, n, d), xkv (B, m, d)."""
    q, k, v = _apply(q_lin, xq), _apply(k_lin, xkv), _apply(v_lin, xkv)   # eqs 6-7 (B, ., d_model)
    b, nq, dm = q.shape
    dh = dm // heads
    split = lambda z: z.reshape(b, z.shape[1], heads, dh).transpose(0, 2, 1, 3)   # (B, h, ., d_h)
    qh, kh, vh = split(q), split(k), split(v)
    att = softmax(qh @ kh.transpose(0, 1, 3, 2) / math.sqrt(dh), axis=-1)   # eqs 8, 9: over keys
    heads_out = att @ vh                                                    # eqs 8, 9: x V
    concat = heads_out.transpose(0, 2, 1, 3).reshape(b, nq, dm)             # eqs 10, 11: concat(head_1..h)
    return _apply(out_lin, concat)                                          # eqs 10, 11: x W^s / W^c


def _cfg_get(cfg: Any, name: str):
    return cfg[name] if isinstance(cfg, dict) else getattr(cfg, name)


def reference_forward(state_dict, cfg, text, image, text_mask=None, image_mask=None) -> dict[str, np.ndarray]:
    """All stages of SG-MFT for a ``state_dict`` and a model config (dataclass or dict).

    ``text``, ``image``: (B, D) arrays; masks: optional (B,) booleans (False = absent).
    Supports ``fusion`` in {sfm, concat, sum}, ``use_sim`` on/off, every SIM option.
    """
    c = {k: _cfg_get(cfg, k) for k in ("dim", "n_tokens", "attn_dim", "heads", "input_scale", "use_sim",
                                       "pm_norm", "pe_scale", "ffn_mode", "ffn_hidden", "ffn_side",
                                       "norm_mode", "fusion", "sfm_residual", "sfm_merge",
                                       "classifier_hidden", "num_classes")}
    P = _Params(state_dict)
    D, n, dm, h, dh_ffn = c["dim"], c["n_tokens"], c["attn_dim"], c["heads"], c["ffn_hidden"]
    d = D // n
    norm = c["norm_mode"] if c["norm_mode"] != "auto" else ("vector" if d < 16 else "token")
    ln_axes = (-2, -1) if norm == "vector" else (-1,)
    ln_shape = (n, d) if norm == "vector" else (d,)
    scale = math.sqrt(D) if c["input_scale"] == "sqrt_dim" else float(c["input_scale"])
    S: dict[str, np.ndarray] = {}

    text, image = np.asarray(text, dtype=np.float64), np.asarray(image, dtype=np.float64)
    B = text.shape[0]

    def modality(x, mask, key):
        x = x * scale                                                       # input scaling
        miss = P.get(NAMES[key], (D,))
        if mask is not None:
            x = np.where(np.asarray(mask, dtype=bool)[:, None], x, miss)    # absent -> placeholder
        return x.reshape(B, n, d)                                           # D-vector -> n tokens of width d

    xt = S["xt"] = modality(text, text_mask, "missing_text")
    xi = S["xi"] = modality(image, image_mask, "missing_image")

    if c["use_sim"]:
        lin = lambda key, side, n_in, n_out, bias=True: P.linear(NAMES[key].format(side=side), n_in, n_out, bias)
        proj = {s: {w: lin(w, s, d, dm) for w in ("W_Q", "W_K", "W_V")} for s in ("t", "i")}
        for s, x in (("t", xt), ("i", xi)):                                 # eq 6 (text), eq 7 (image)
            S[f"q_{s}"] = _apply(proj[s]["W_Q"], x)
            S[f"k_{s}"] = _apply(proj[s]["W_K"], x)
            S[f"v_{s}"] = _apply(proj[s]["W_V"], x)

        s_m = (xt * xi).sum(-1)                                             # eq 1: S^m_j = sum_k X_t[j,k] X_i[j,k]
        p_m = softmax(s_m, axis=-1) if c["pm_norm"] == "softmax" else 1 / (1 + np.exp(-s_m))   # eq 3 (over n)
        S["p_m"] = p_m
        pm = p_m[..., None]                                                 # broadcast over the width d

        def side(x_own, x_other, s):
            """Eqs 8-13 for the side whose tokens are x_own ("i": image side as printed)."""
            o = "t" if s == "i" else "i"
            sa = mha(x_own, x_own, proj[s]["W_Q"], proj[s]["W_K"], proj[s]["W_V"],
                     lin("W_s", s, dm, d), h)                                # eqs 8, 10: SA(Q_s, K_s, V_s) W^s
            ca = mha(x_other, x_own, proj[o]["W_Q"], proj[s]["W_K"], proj[s]["W_V"],
                     lin("W_c", s, dm, d), h)                                # eqs 9, 11: CA(Q_other, K_s, V_s) W^c
            x_mix = ca * pm + sa * (1 - pm)                                 # eq 12: CA (x) P^m (+) SA (x) (1 - P^m)
            g = P.get(NAMES["LN_att"].format(side=s) + ".weight", ln_shape)
            bb = P.get(NAMES["LN_att"].format(side=s) + ".bias", ln_shape)
            xc = layer_norm(x_mix + x_own, g, bb, ln_axes)                  # eq 13: LayerNorm(X + F)
            return sa, ca, x_mix, xc

        S["sa_i"], S["ca_i"], S["x_image"], S["xc_i"] = side(xi, xt, "i")   # image side (eqs 8-13)
        S["sa_t"], S["ca_t"], S["x_text"], S["xc_t"] = side(xt, xi, "t")   # text side (roles swapped)
        xc_t, xc_i = S["xc_t"], S["xc_i"]

        # Similarity-aware FFN on ffn_side (eqs 14-16), ordinary FFN on the other side (Table 4).
        a, b, own_c, other_c = (xt, xi, xc_t, xc_i) if c["ffn_side"] == "text" else (xi, xt, xc_i, xc_t)
        s_e = a @ b.transpose(0, 2, 1)                                      # eq 2: S^e = X_a X_b^T (B, n, n)
        if c["pe_scale"] == "sqrt_d":
            s_e = s_e / math.sqrt(d)                                        # option: scaled logits
        p_e = S["p_e"] = softmax(s_e, axis=-1)                              # eqs 4-5: each row over b's positions
        x_inter = S["x_inter"] = p_e @ other_c                              # eq 14: X_inter = P^e X^C_other

        width = d if c["ffn_mode"] == "token" else D                        # token-wise or whole D-vector
        flat = (lambda z: z) if c["ffn_mode"] == "token" else (lambda z: z.reshape(B, D))
        unflat = lambda z: z.reshape(B, n, d)
        W1 = P.linear(NAMES["W1_sim"], width, dh_ffn)
        W3 = P.linear(NAMES["W3_sim"], width, dh_ffn, bias=False)
        W2 = P.linear(NAMES["W2_sim"], dh_ffn, width)
        hid = np.maximum(_apply(W1, flat(own_c)) + _apply(W3, flat(x_inter)), 0.0)   # eq 15: ReLU(X^C W1 + X_inter W3 + b1)
        ffn_sim = unflat(_apply(W2, hid))                                   # eq 15: (...) W2 + b2
        V1 = P.linear(NAMES["W1_plain"], width, dh_ffn)
        V2 = P.linear(NAMES["W2_plain"], dh_ffn, width)
        ffn_plain = unflat(_apply(V2, np.maximum(_apply(V1, flat(other_c)), 0.0)))   # ordinary FFN: ReLU(X W1 + b1) W2 + b2
        S["ffn_t"], S["ffn_i"] = (ffn_sim, ffn_plain) if c["ffn_side"] == "text" else (ffn_plain, ffn_sim)
        for s, f, x in (("t", S["ffn_t"], xc_t), ("i", S["ffn_i"], xc_i)):
            g = P.get(NAMES["LN_ffn"].format(side=s) + ".weight", ln_shape)
            bb = P.get(NAMES["LN_ffn"].format(side=s) + ".bias", ln_shape)
            S[f"fs_{s}"] = layer_norm(f + x, g, bb, ln_axes)               # eq 16: LayerNorm(FFN + X^C)
        ft, fi = S["fs_t"], S["fs_i"]
    else:
        ft, fi = xt, xi                                                     # ablation: no SIM

    if c["fusion"] == "sfm":
        def cross(prefix, xq, xkv):                                         # eq 17's CA in the form of eq 11
            g = lambda k, n_in, n_out: P.linear(f"{prefix}.{NAMES[k]}", n_in, n_out)
            return mha(xq, xkv, g("CA_Q", d, dm), g("CA_K", d, dm), g("CA_V", d, dm), g("CA_out", dm, d), h)
        ca1 = S["ca1"] = cross(NAMES["CA1"], ft, fi)                        # eq 17: CA(query F^S_text, kv F^S_image)
        ca2 = S["ca2"] = cross(NAMES["CA2"], fi, ft)                        # eq 17: CA(query F^S_image, kv F^S_text)
        if c["sfm_residual"]:
            ca1, ca2 = ca1 + ft, ca2 + fi                                   # option: each CA layer keeps its query
        if c["sfm_merge"] == "concat":
            fused = np.concatenate([ca1.reshape(B, D), ca2.reshape(B, D)], axis=1)   # option: side by side (R^2D)
        else:
            fused = (ca1 + ca2).reshape(B, D)                               # eq 17: (+) element-wise, R^D
    elif c["fusion"] == "concat":
        fused = np.concatenate([ft.reshape(B, D), fi.reshape(B, D)], axis=1)         # ablation: [F_t ; F_i]
    elif c["fusion"] == "sum":
        fused = (ft + fi).reshape(B, D)                                     # ablation: F_t + F_i
    else:
        raise ValueError(f"reference: fusion {c['fusion']!r} is not modelled")
    S["fused"] = fused

    # Eq 18: MC = len(hidden) + 1 linear layers with ReLU between them (softmax left to the loss).
    mc = NAMES["MC"]
    keys = sorted((k for k in P.sd if k.startswith(mc + ".") and k.endswith(".weight")),
                  key=lambda k: int(k.split(".")[-2]))                      # "<MC>...<idx>.weight", by idx
    widths = [fused.shape[1], *c["classifier_hidden"], c["num_classes"]]
    if len(keys) != len(widths) - 1:
        raise AssertionError(f"reference: classifier has {len(keys)} linear layers, eq 18 config needs {len(widths) - 1}")
    z = fused
    for layer, (key, w_in, w_out) in enumerate(zip(keys, widths[:-1], widths[1:])):
        z = _apply(P.linear(key[: -len(".weight")], w_in, w_out), z)        # eq 18: linear layer
        if layer < len(keys) - 1:
            z = np.maximum(z, 0.0)                                          # eq 18: ReLU between layers
    S["logits"] = z

    left = P.unused()
    if left:
        raise AssertionError(f"reference: parameters not covered by the equations: {left}")
    return S
