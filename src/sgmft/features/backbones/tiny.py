"""A tiny, RANDOMLY initialised Chinese-CLIP checkpoint, for tests and the offline demo.

``build_tiny_chinese_clip(dir)`` writes a complete transformers checkpoint directory
(``config.json``, ``model.safetensors``, ``vocab.txt`` + tokenizer config,
``preprocessor_config.json``) laid out exactly like the real OFA-Sys ones, so
``load_backbone("chinese-clip:<dir>")`` exercises the same code path as real weights.

Its features are random projections, meaningless for classification beyond what
random features carry. Never report results computed with it as Chinese-CLIP results.
"""

from __future__ import annotations

from pathlib import Path

_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Model shapes. "tiny" is for tests (~0.8 M parameters, almost all in the CJK embedding);
# "base" has the transformer shapes of OFA-Sys/chinese-clip-vit-base-patch16 (ViT-B/16 +
# 12-layer 768-wide text tower; random weights, no download), for benchmarks that need a
# realistic forward cost.
SIZES = {
    "tiny": dict(text=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
                 vision=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=16),
                 projection_dim=32),
    "base": dict(text=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
                 vision=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             image_size=224, patch_size=16),
                 projection_dim=512),
    # OFA-Sys/chinese-clip-vit-huge-patch14 shapes (RoBERTa-wwm-large text, ViT-H/14 image, D = 1024):
    # ~0.95 B parameters, ~3.8 GB in fp32 -- benchmarks only
    "huge": dict(text=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
                 vision=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                             image_size=224, patch_size=14),
                 projection_dim=1024),
}


def tiny_vocab() -> list[str]:
    """Special tokens, ASCII, CJK punctuation and the whole CJK Unified Ideographs block.

    BERT's tokenizer splits Chinese into single characters, so this covers any Chinese
    text (the synthetic posts included) without [UNK].
    """
    ascii_ = [chr(c) for c in range(33, 127)]
    words = ["##" + chr(c) for c in range(ord("a"), ord("z") + 1)] + ["##" + str(d) for d in range(10)]
    cjk_punct = list("，。！？、；：“”‘’（）《》【】…—～·「」『』")
    cjk = [chr(c) for c in range(0x4E00, 0xA000)]
    seen, out = set(), []
    for t in _SPECIAL + ascii_ + words + cjk_punct + cjk:
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def build_tiny_chinese_clip(out_dir: str | Path, seed: int = 0, *, size: str = "tiny") -> Path:
    """Write a random Chinese-CLIP checkpoint to ``out_dir`` and return it.

    Deterministic: the same ``seed`` and ``size`` give the same weights (and the same
    backbone fingerprint). ``size="base"`` gives ViT-B/16-like shapes for benchmarking.
    """
    import torch
    from transformers import (
        BertTokenizer, ChineseCLIPConfig, ChineseCLIPImageProcessorPil, ChineseCLIPModel,
    )

    s = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizer.from_pretrained(str(out), do_lower_case=True, model_max_length=512)
    assert len(tok) == len(vocab), "BertTokenizer did not pick up vocab.txt"
    tok.save_pretrained(str(out))

    cfg = ChineseCLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=64, **s["text"]),
        vision_config=dict(**s["vision"]), projection_dim=s["projection_dim"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ChineseCLIPModel(cfg).eval()
    model.save_pretrained(str(out))

    side = s["vision"]["image_size"]
    # Same preprocessing as the OFA-Sys checkpoints: squash-resize to side x side, bicubic,
    # no centre crop, CLIP mean/std.
    proc = ChineseCLIPImageProcessorPil(size={"height": side, "width": side}, do_center_crop=False,
                                        crop_size={"height": side, "width": side})
    proc.save_pretrained(str(out))
    (out / "README.md").write_text(
        f"Tiny RANDOM Chinese-CLIP ({size}, seed {seed}) built by sgmft.features.backbones.tiny for tests and\n"
        "the offline demo. Its features are meaningless: not a real Chinese-CLIP checkpoint.\n",
        encoding="utf-8")
    from sgmft.atomic import share_tree

    share_tree(out)                  # safetensors writes 0600: make the folder readable under the umask
    return out


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny RANDOM OpenAI-style ``CLIPModel`` checkpoint (byte-level BPE, no merges), to
    test the ``hf-clip:`` path offline. Same caveat: the features are meaningless."""
    import json

    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # GPT-2's byte -> printable-unicode table; every byte is a token, with and without </w>.
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab: dict[str, int] = {}
    for t in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(t, len(vocab))
    (out / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    CLIPTokenizer.from_pretrained(str(out)).save_pretrained(str(out))
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=16),
        projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg).eval()
    model.save_pretrained(str(out))
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(out))
    from sgmft.atomic import share_tree

    share_tree(out)
    return out
