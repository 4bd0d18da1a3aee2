"""Ideas for a faster CPU forward, timed interleaved in one process (issue 22, item 2).

Variants (``--variants``, comma list; the first is the reference for speed-up and cosine):
``fp32``/``bf16``/``int8dyn`` = sgmft's eager precisions; ``bf16c`` = bf16 under
torch.compile (Inductor, freezing; what ``Backbone.compile_forward`` does); ``bf16ma`` =
the same with mode="max-autotune"; ``fp32c``; ``int8s`` = static int8 through PT2E
(torchao's X86InductorQuantizer, calibrated on the timed batch itself, bf16 autocast for
the non-quantised ops) + compile; ``int8s32`` = the same without bf16 autocast; on a CPU where
sgmft's int8 is per token (VNNI or AMX-int8): ``int8mlp`` = that int8 with each vision MLP run on
``--mlp-rows`` tokens at a time (fc1, GELU, quantiser and fc2 on a block that stays in cache; same
bytes), ``int8zp0`` = that int8 with oneDNN told zero point 0 and the u8 offset's 128 x sum(w)
subtracted afterwards, in one compiled epilogue (oneDNN skips its zero-point compensation).
Inputs: one batch of ``--bs`` random 52-token texts (ragged attention masks) and ``--bs``
random 224 px images, on a RANDOM Chinese-CLIP of ``--size`` shapes (built once under
``--model-dir``). Rounds in turn (round r starts with the r-th variant). Prints JSON: seconds per round, speed-up (total and per round), cosine
to the reference (mean/min), set-up seconds (load + compile + first pass) and the model
FLOP rate of the best round (FLOPs counted by torch's FlopCounterMode on fp32).

    python benchmarks/bench_extract_ideas.py --size base --bs 16 --rounds 3 \
        --variants fp32,bf16,bf16c,int8dyn,int8s      # int8s needs torchao (pip install torchao)
"""
import argparse, json, os, sys, time, warnings, copy
warnings.simplefilter("ignore")
import numpy as np, torch, torch.nn.functional as F
ap = argparse.ArgumentParser()
ap.add_argument("--size", default="base"); ap.add_argument("--bs", type=int, default=16)
ap.add_argument("--rounds", type=int, default=3); ap.add_argument("--variants", default="fp32,bf16,int8dyn,bf16c,int8s")
ap.add_argument("--threads", type=int, default=2); ap.add_argument("--tlen", type=int, default=52)
ap.add_argument("--mlp-rows", type=int, default=256, help="tokens per block for int8mlp")
ap.add_argument("--model-dir", default=None, help="where the random model is built (default: a temp dir)")
a = ap.parse_args()
torch.set_num_threads(a.threads)
from sgmft.features.backbones.tiny import build_tiny_chinese_clip
from sgmft.features.backbones import load_backbone
import tempfile
d = a.model_dir or os.path.join(tempfile.gettempdir(), f"sgmft-bench-ideas-{a.size}")
if not os.path.exists(d + "/config.json"):
    build_tiny_chinese_clip(d, size=a.size)
spec = f"chinese-clip:{d}"
g = torch.Generator().manual_seed(0)
B = a.bs
ids = torch.randint(100, 20000, (B, a.tlen), generator=g); ids[:, 0] = 2
mask = torch.ones_like(ids); 
for i in range(B): mask[i, 10 + i * 2 % (a.tlen - 10):] = 0
toks = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
pix = torch.randn(B, 3, 224, 224, generator=g)

class Txt(torch.nn.Module):
    def __init__(s, m): super().__init__(); s.m = m
    def forward(s, input_ids, attention_mask, token_type_ids): return s.m.get_text_features(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).pooler_output
class Img(torch.nn.Module):
    def __init__(s, m): super().__init__(); s.m = m
    def forward(s, px): return s.m.get_image_features(pixel_values=px).pooler_output

def eager(prec):
    bb = load_backbone(spec, dtype=prec, batch_size=B)
    return lambda: (bb.forward_text(toks), bb.forward_images(pix))

def compiled(prec, mode=None):
    import torch._inductor.config as ic
    ic.freezing = True
    ic.cpp.enable_kernel_profile = False
    bb = load_backbone(spec, dtype=prec, batch_size=B)
    t, i = Txt(bb.model).eval(), Img(bb.model).eval()
    ct = torch.compile(t, mode=mode); ci = torch.compile(i, mode=mode)
    def run():
        with torch.inference_mode(), bb._autocast():
            x = ct(**toks); y = ci(pix.to(torch.bfloat16) if prec == "bf16" else pix)
        return F.normalize(x.float(), dim=-1).numpy(), F.normalize(y.float(), dim=-1).numpy()
    return run

def int8_static(mixed_bf16=True):
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, convert_pt2e
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    import torch._inductor.config as ic
    ic.freezing = True
    bb = load_backbone(spec, dtype="fp32", batch_size=B)
    outs = []
    for mod, args, kw in ((Txt(bb.model).eval(), (), toks), (Img(bb.model).eval(), (pix,), {})):
        with torch.no_grad():
            ep = torch.export.export(mod, args, kw).module()
            q = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
            p = prepare_pt2e(ep, q)
            p(*args, **kw)  # calibrate on the batch itself (bench only)
            c = convert_pt2e(p)
        outs.append(torch.compile(c))
    ct, ci = outs
    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_bf16):
            x = ct(**toks); y = ci(pix)
        return F.normalize(x.float(), dim=-1).numpy(), F.normalize(y.float(), dim=-1).numpy()
    return run

class RowBlocks(torch.nn.Module):
    """A per-token module run on ``rows`` tokens at a time (int8mlp)."""
    def __init__(s, m, rows): super().__init__(); s.m, s.rows = m, rows
    def forward(s, x):
        x2 = x.reshape(-1, x.shape[-1]); out = torch.empty_like(x2)
        for i in range(0, x2.shape[0], s.rows):
            out[i:i + s.rows] = s.m(x2[i:i + s.rows])
        return out.view(x.shape)

def int8_row_blocks(rows):
    bb = load_backbone(spec, dtype="int8", batch_size=B)
    for layer in bb.model.vision_model.encoder.layers:
        layer.mlp = RowBlocks(layer.mlp, rows)
    return lambda: (bb.forward_text(toks), bb.forward_images(pix))

def int8_zero_point_0():
    import types
    from sgmft.features.backbones import int8_linear as il
    epi = torch.compile(lambda y, c, scale, bias: (y - c) * scale + bias, dynamic=True)
    def fwd(self, x):
        x2 = x.reshape(-1, self.in_features).float()
        q, scale = il._quantizer(self.compiled_quantizer)(x2)
        y = torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, self.packed, self.w_scale, self._w_zp,
                                               None, 1.0, 0, torch.float32, "none", [], "")
        return epi(y, self._c, scale, self._b).view(*x.shape[:-1], self.out_features)
    bb = load_backbone(spec, dtype="int8", batch_size=B)
    for m in bb.model.modules():
        if isinstance(m, il.TokenInt8Linear):
            m._c = 128.0 * m.w_scale * m.int8_weight().float().sum(1)
            m._b = m.bias if m.bias is not None else torch.zeros(())
            m.forward = types.MethodType(fwd, m)
    return lambda: (bb.forward_text(toks), bb.forward_images(pix))

mk = {"fp32": lambda: eager("fp32"), "int8mlp": lambda: int8_row_blocks(a.mlp_rows), "int8zp0": int8_zero_point_0, "bf16": lambda: eager("bf16"), "int8dyn": lambda: eager("int8"),
      "bf16c": lambda: compiled("bf16"), "bf16ma": lambda: compiled("bf16", "max-autotune"),
      "fp32c": lambda: compiled("fp32"), "int8s": lambda: int8_static(True), "int8s32": lambda: int8_static(False)}
names = a.variants.split(",")
from torch.utils.flop_counter import FlopCounterMode
_bb = load_backbone(spec, dtype="fp32", batch_size=B)
with FlopCounterMode(display=False) as fc:
    _bb.forward_text(toks); _bb.forward_images(pix)
FLOPS = fc.get_total_flops(); del _bb
print("flops/round", FLOPS / 1e9, file=sys.stderr, flush=True)
runs, first = {}, {}
for n in names:
    t = time.perf_counter(); runs[n] = mk[n](); runs[n](); first[n] = time.perf_counter() - t
    print(n, "ready", round(first[n], 1), file=sys.stderr, flush=True)
secs = {n: [] for n in names}; feats = {}
for r in range(a.rounds):                 # round r starts with the r-th variant: none always follows the same one
    for n in names[r % len(names):] + names[:r % len(names)]:
        t = time.perf_counter(); f = runs[n](); secs[n].append(time.perf_counter() - t); feats[n] = f
ref = feats[names[0]]
def cos(x, y): return (x * y).sum(-1)
res = {}
for n in names:
    c = np.concatenate([cos(feats[n][0], ref[0]), cos(feats[n][1], ref[1])])
    res[n] = {"s": [round(x, 3) for x in secs[n]], "speedup": round(sum(secs[names[0]]) / sum(secs[n]), 2),
              "per_round": [round(x / y, 2) for x, y in zip(secs[names[0]], secs[n])],
              "cos_mean": round(float(c.mean()), 5), "cos_min": round(float(c.min()), 5), "setup_s": round(first[n], 1), "gflops_best": round(FLOPS / min(secs[n]) / 1e9, 1)}
print(json.dumps({"command": "python benchmarks/bench_extract_ideas.py " + " ".join(sys.argv[1:]),
                  "torch": torch.__version__, "flops_per_round_g": FLOPS / 1e9, "size": a.size, "bs": B, "threads": a.threads, "res": res, "load": os.getloadavg()[0]}, indent=1))
