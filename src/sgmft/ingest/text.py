"""Weibo text cleaning (paper section 3.1): strip noise, segment with jieba, drop stop words.

The pipeline, in order (every step has a switch in :class:`CleanConfig`; see
``docs/text-cleaning.md``):

0. ``normalize``   Unicode NFKC (full-width ``ＩＭＡＸ！`` -> ``IMAX!``).
1. ``reposts``     ``//@name:`` repost-chain markers, a bare ``//``, ``回复@name:`` and the
                   boilerplate ``转发微博`` / ``Repost``. The words of every hop are kept.
2. ``urls``        ``http(s)://...``, ``www....``, bare ``t.cn/...`` and Weibo's ``网页链接``.
3. ``mentions``    ``@name`` (a name runs until whitespace or punctuation).
4. ``emoticons``   bracketed Weibo emoticons ``[doge]``, ``[哈哈]`` (1-8 characters inside).
5. ``hashtags``    ``#topic#`` -> ``topic`` (the topic words are kept, the ``#`` dropped).
6. ``emoji``       Unicode emoji (pictographs, dingbats, flags, ZWJ, variation selectors).
7. ``punctuation`` Unicode punctuation and symbol characters (categories P* and S*).
8. ``segment``     jieba word segmentation (precise mode, HMM on; optional user dictionary).
9. ``stopwords``   Chinese + English stop words (stopwordsiso ``zh`` + ``en``), compared
                   case-insensitively.

An element whose step is switched *off* is kept verbatim as one token: later steps
(punctuation, segmentation, stop words) do not cut it up, so ``urls=False`` keeps
``http://t.cn/A6xyz`` whole. Tokens are joined with ``join_with`` (a space), the natural
input for a text encoder. A text with nothing left is returned as ``""`` (the caller marks
the post text-less; it is not an error).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import unicodedata
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from sgmft.errors import InputError

__all__ = ["CleanConfig", "TextCleaner", "clean_config", "clean_text", "load_stopwords", "parse_long_text", "LONG_TEXT_POLICIES",
           "STOPWORD_SOURCES"]

# Bump when the meaning of a step changes, so cached cleaned text is invalidated.
CLEANER_VERSION = 1

# -- patterns (applied after NFKC, so full-width ：＠＃ are already ASCII) ---------------------
_NAME = r"[\w\-]{1,30}"  # a Weibo nickname: CJK, letters, digits, _ and - (up to 30)
_URL_CHARS = r"[A-Za-z0-9\-._~:/?=&%+]"
_PATTERNS: dict[str, re.Pattern[str]] = {
    "reposts": re.compile(
        rf"//\s*@{_NAME}\s*[:：]?|(?<![:/])//|回复\s*@{_NAME}\s*[:：]|转发微博|\bRepost\b",
        re.IGNORECASE),
    "urls": re.compile(
        rf"(?:https?://|www\.){_URL_CHARS}+|(?<![A-Za-z0-9.])t\.cn/[A-Za-z0-9]+|O?网页链接", re.IGNORECASE),
    "mentions": re.compile(rf"@{_NAME}"),
    "emoticons": re.compile(r"\[[^\[\]\s]{1,8}\]"),
    "hashtags": re.compile(r"#([^#\n]{1,60})#"),
    "emoji": re.compile(
        "[\U0001F000-\U0001FAFF"   # pictographs, emoticons, transport, flags, skin tones ...
        "\u2600-\u27BF"            # misc symbols + dingbats (☀ ❤ ✈ ✨)
        "\u2300-\u23FF"            # misc technical (⌚ ⏰)
        "\u2B00-\u2BFF"            # arrows/stars (⭐ ⬆)
        "\uFE0E\uFE0F\u200D\u20E3"  # variation selectors, zero-width joiner, keycap
        "\U000E0020-\U000E007F"    # tag characters (subdivision flags)
        "\u3030\u303D\u3297\u3299]+"),
}
_STEP_ORDER = ("reposts", "urls", "mentions", "emoticons", "hashtags", "emoji")

# Known stop-word sources: name -> loader returning an iterable of words.
STOPWORD_SOURCES = ("stopwordsiso-zh", "stopwordsiso-en", "pystopwords-zh")


@dataclass(frozen=True)
class CleanConfig:
    """Switches of the cleaning pipeline; every step defaults to on (the paper's setting)."""

    urls: bool = True
    reposts: bool = True
    mentions: bool = True
    emoticons: bool = True
    emoji: bool = True
    hashtags: bool = True
    punctuation: bool = True
    segment: bool = True
    stopwords: bool = True
    normalize: bool = True
    user_dict: str | None = None          # jieba user dictionary file ("word [freq] [tag]" lines)
    extra_stopwords: tuple[str, ...] = ()  # added to the list
    keep_words: tuple[str, ...] = ()       # removed from the list (never dropped)
    stopword_sources: tuple[str, ...] = ("stopwordsiso-zh", "stopwordsiso-en")
    join_with: str = " "
    # What the text encoder sees of a text longer than its context (52 tokens for Chinese-CLIP):
    # "truncate" (the first tokens; the default and the behaviour before this option),
    # "head-tail[:H]" (the first H tokens and the last ones; H default: half the context) or
    # "chunk-mean[:K]" (the text in consecutive windows, at most K (default 8), each encoded,
    # the L2-normalised embeddings averaged and re-normalised). Applied by
    # sgmft.features.encode; see docs/backbones.md, "Long posts". Part of the feature
    # contract (clean_config) and of the cache key (the fingerprint, when not "truncate").
    long_text: str = "truncate"

    def __post_init__(self) -> None:
        for name in ("extra_stopwords", "keep_words", "stopword_sources"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"CleanConfig.{name} must be a sequence of strings, not a string")
            object.__setattr__(self, name, tuple(value))
        parse_long_text(self.long_text)
        unknown = set(self.stopword_sources) - set(STOPWORD_SOURCES)
        if unknown:
            raise InputError(f"unknown stopword source(s) {sorted(unknown)}; known: {STOPWORD_SOURCES}")


def clean_config(data: dict | None = None, overrides: list[str] | None = None,
                 where: str = "clean options") -> CleanConfig:
    """A CleanConfig from a mapping of its fields and ``key=value`` overrides (``urls=false``,
    ``extra_stopwords=[电影]``, ``long_text=chunk-mean:4``), through the one configuration grammar
    (:func:`sgmft.config.build_config`, :func:`sgmft.config.apply_overrides`): a typo or a bad value
    is a ConfigError naming the field, the value and what is allowed."""
    from sgmft.config import apply_overrides, build_config

    return apply_overrides(build_config(CleanConfig, dict(data or {}), where), overrides, "clean")


LONG_TEXT_POLICIES = ("truncate", "head-tail", "chunk-mean")
DEFAULT_MAX_CHUNKS = 8


def parse_long_text(spec: str) -> tuple[str, int | None]:
    """``"truncate"`` / ``"head-tail[:H]"`` / ``"chunk-mean[:K]"`` -> ``(policy, H or K or None)``."""
    if not isinstance(spec, str):
        raise InputError(f"long_text must be a string such as 'head-tail' or 'chunk-mean:4', got {spec!r}")
    name, _, arg = spec.partition(":")
    if name not in LONG_TEXT_POLICIES or (name == "truncate" and arg):
        raise InputError(f"long_text {spec!r}: choose truncate, head-tail[:H] (H head tokens) or "
                         "chunk-mean[:K] (at most K windows)")
    if not arg:
        return name, None
    if not arg.isdigit() or int(arg) < (0 if name == "head-tail" else 1):
        raise InputError(f"long_text {spec!r}: {'H' if name == 'head-tail' else 'K'} must be a "
                         f"{'non-negative' if name == 'head-tail' else 'positive'} integer")
    return name, int(arg)


@lru_cache(maxsize=None)
def _load_source(name: str) -> frozenset[str]:
    if name.startswith("stopwordsiso-"):
        import stopwordsiso
        return frozenset(stopwordsiso.stopwords(name.split("-", 1)[1]))
    if name == "pystopwords-zh":
        try:
            import pystopwords
        except ImportError as e:  # optional extra
            raise ImportError("stopword source 'pystopwords-zh' needs `pip install pystopwords`") from e
        return frozenset(pystopwords.stopwords("zh", "all"))
    raise InputError(f"unknown stopword source {name!r}")


def load_stopwords(cfg: CleanConfig | None = None) -> frozenset[str]:
    """The effective stop-word set of ``cfg``: its sources + extras - keep words, lower-cased."""
    cfg = cfg or CleanConfig()
    words: set[str] = set()
    for src in cfg.stopword_sources:
        words |= _load_source(src)
    words |= set(cfg.extra_stopwords)
    # punctuation-only entries (the zh list has 、。《 ...) belong to the punctuation step
    words = {w.strip().lower() for w in words if not all(_is_punct(c) or c.isspace() for c in w)}
    return frozenset(words - {w.lower() for w in cfg.keep_words})


# -- jieba: one quiet Tokenizer per user dictionary, shared by all cleaners of a process ----
_TOKENIZERS: dict[tuple, object] = {}
_TOKENIZER_LOCK = threading.Lock()


def _tokenizer(user_dict: str | None):
    key: tuple = (None,)
    if user_dict is not None:
        p = Path(user_dict).resolve()
        key = (str(p), p.stat().st_mtime_ns)  # a FileNotFoundError here names the bad path
    with _TOKENIZER_LOCK:
        tok = _TOKENIZERS.get(key)
        if tok is None:
            import jieba
            jieba.setLogLevel(logging.WARNING)  # silence "Building prefix dict ..." on stderr
            tok = jieba.Tokenizer()
            tok.initialize()
            if user_dict is not None:
                tok.load_userdict(str(Path(user_dict).resolve()))
            _TOKENIZERS[key] = tok
        return tok


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "PS"


class TextCleaner:
    """Apply :class:`CleanConfig` to Weibo texts. Picklable (the jieba tokenizer is re-made)."""

    def __init__(self, cfg: CleanConfig | None = None) -> None:
        self.cfg = cfg or CleanConfig()
        self._stop = load_stopwords(self.cfg) if self.cfg.stopwords else frozenset()
        self._tok = None

    def __getstate__(self) -> dict:
        return {"cfg": self.cfg}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cfg"])

    def __repr__(self) -> str:
        return f"TextCleaner({self.cfg!r})"

    # -- public API -----------------------------------------------------------------------
    def tokens(self, text: str | None) -> list[str]:
        """The cleaned tokens of ``text`` (empty list for empty/None input)."""
        if not text:
            return []
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        s = unicodedata.normalize("NFKC", text) if self.cfg.normalize else text
        # Segments: (kept_verbatim, text). A removed element splits its text segment in two.
        segs: list[tuple[bool, str]] = [(False, s)]
        for step in _STEP_ORDER:
            segs = self._apply(step, segs)
        out: list[str] = []
        for verbatim, piece in segs:
            if verbatim:
                out.append(piece)
            else:
                out.extend(self._words(piece))
        return out

    def clean(self, text: str | None) -> str:
        """The cleaned text: tokens joined with ``cfg.join_with``; ``""`` if nothing is left."""
        return self.cfg.join_with.join(self.tokens(text))

    __call__ = clean

    def fingerprint(self) -> str:
        """A stable hash of everything that decides the output (for caching cleaned text)."""
        import jieba
        h = hashlib.sha256()
        cfg = asdict(self.cfg)
        if cfg["long_text"] == "truncate":   # the default: fingerprints from before the option are unchanged
            del cfg["long_text"]
        h.update(json.dumps(cfg, sort_keys=True, ensure_ascii=False).encode())
        h.update(f"v{CLEANER_VERSION} jieba{jieba.__version__}".encode())
        h.update("\n".join(sorted(load_stopwords(self.cfg))).encode())
        if self.cfg.user_dict:
            h.update(Path(self.cfg.user_dict).read_bytes())
        return h.hexdigest()[:16]

    # -- steps ----------------------------------------------------------------------------
    def _apply(self, step: str, segs: list[tuple[bool, str]]) -> list[tuple[bool, str]]:
        pat, on = _PATTERNS[step], getattr(self.cfg, step)
        out: list[tuple[bool, str]] = []
        for verbatim, piece in segs:
            if verbatim:
                out.append((True, piece))
                continue
            pos = 0
            for m in pat.finditer(piece):
                out.append((False, piece[pos:m.start()]))
                if not on:
                    out.append((True, m.group(0)))
                elif step == "hashtags":
                    out.append((False, m.group(1)))  # keep the topic words
                pos = m.end()
            out.append((False, piece[pos:]))
        return [(v, p) for v, p in out if p and (v or not p.isspace())]

    def _words(self, piece: str) -> list[str]:
        if self.cfg.punctuation:
            piece = "".join(" " if _is_punct(c) else c for c in piece)
        if self.cfg.segment:
            if self._tok is None:
                self._tok = _tokenizer(self.cfg.user_dict)
            words = [w.strip() for w in self._tok.lcut(piece)]
        else:
            words = piece.split()
        stop = self._stop
        return [w for w in words if w and w.lower() not in stop]


@lru_cache(maxsize=16)
def _cached_cleaner(cfg: CleanConfig) -> TextCleaner:
    return TextCleaner(cfg)


def clean_text(text: str | None, cfg: CleanConfig | None = None) -> str:
    """Clean one text with ``cfg`` (default: every step on). Reuses a cached cleaner."""
    return _cached_cleaner(cfg or CleanConfig())(text)
