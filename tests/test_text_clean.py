"""sgmft.ingest.text: every cleaning step on realistic Weibo strings, and every switch."""

from __future__ import annotations

import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from sgmft.ingest.text import CleanConfig, TextCleaner, clean_text, load_stopwords

WEIBO = ("//@小明:哈哈哈[doge] 今天在万达影城看了《流浪地球》，太震撼了！！http://t.cn/A6xyz "
         "#周末观影# @电影君")


@pytest.fixture(scope="module")
def cleaner():
    return TextCleaner()


def test_full_pipeline_on_a_typical_post(cleaner):
    toks = cleaner.tokens(WEIBO)
    assert toks == ["哈哈哈", "今天", "万达", "影城", "流浪", "地球", "太", "震撼", "周末", "观影"]
    out = cleaner.clean(WEIBO)
    assert out == " ".join(toks)
    for gone in ("http", "t.cn", "A6xyz", "@", "电影君", "小明", "doge", "#", "《", "，", "！", "的", "了", "在", "看"):
        assert gone not in out


@pytest.mark.parametrize("text", ["", None, "转发微博", "[哈哈][哈哈]", "Repost", "网页链接",
                                  "   ", "！！！。。。", "@电影君 http://t.cn/A6xyz //@小明:",
                                  "的了是在", "the and of"])
def test_texts_that_clean_to_nothing_give_empty_string(cleaner, text):
    assert cleaner.clean(text) == ""
    assert cleaner.tokens(text) == []


@pytest.mark.parametrize("text, expected", [
    ("🍜🍜好吃", "好吃"),
    ("这是一个👨\u200d👩\u200d👧家庭🇨🇳照片❤️", "这是 家庭 照片"),
    ("I love the IMAX movie and the popcorn!!! www.example.com/a?b=1", "love IMAX movie popcorn"),
    ("ＩＭＡＸ３Ｄ太棒了～～", "IMAX3D 太棒了"),                       # full-width -> ASCII (NFKC)
    ("#周末观影#电影推荐", "周末 观影 电影 推荐"),                     # topic words kept, # dropped
    ("回复@小红:好吃//@小红:一起去健身房撸铁💪 t.cn/Rabc12", "好吃 一起 健身房 撸 铁"),
    ("分享链接 O网页链接 https://weibo.com/123?from=x", "分享 链接"),
    ("[笑cry][允悲]期末考试【图书馆】", "期末考试 图书馆"),
])
def test_examples(cleaner, text, expected):
    assert cleaner.clean(text) == expected


def test_repost_chain_keeps_every_hops_words(cleaner):
    assert cleaner.clean("羡慕//@阿杰:马住//@小明:周末电影院见") == "羡慕 马住 周末 电影院 见"


def test_url_does_not_swallow_following_text(cleaner):
    assert cleaner.clean("http://t.cn/A6xyz，电影太好看") == "电影 太 好看"


# -- switches: turned off, the element survives as one verbatim token ------------------------
OFF_CASES = [
    ("urls", "看电影 http://t.cn/A6xyz", "http://t.cn/A6xyz"),
    ("reposts", "好看//@小明:电影", "//@小明:"),
    ("mentions", "@电影君 好看", "@电影君"),
    ("emoticons", "好看[doge]", "[doge]"),
    ("hashtags", "#周末观影# 好看", "#周末观影#"),
    ("emoji", "🍜🍜好吃", "🍜🍜"),
    ("punctuation", "震撼了！！", "!"),
    ("stopwords", "我的电影", "的"),
    ("normalize", "ＩＭＡＸ电影", "Ｉ"),  # jieba then splits the full-width letters
]


@pytest.mark.parametrize("switch, text, element", OFF_CASES)
def test_switch_off_keeps_its_element(cleaner, switch, text, element):
    assert element not in cleaner.tokens(text)
    off = TextCleaner(CleanConfig(**{switch: False}))
    assert element in off.tokens(text)


def test_segment_off_splits_on_whitespace_only():
    c = TextCleaner(CleanConfig(segment=False))
    assert c.clean("今天看电影，太震撼了 the movie") == "今天看电影 太震撼了 movie"


def test_everything_off_is_whitespace_split_of_the_input():
    cfg = CleanConfig(**{k: False for k in ("urls", "reposts", "mentions", "emoticons", "emoji",
                                             "hashtags", "punctuation", "segment", "stopwords",
                                             "normalize")})
    assert clean_text("  今天 看电影！ [doge]  ", cfg) == "今天 看电影！ [doge]"


def test_punctuation_entries_of_stoplist_belong_to_punctuation_step():
    c = TextCleaner(CleanConfig(punctuation=False))
    assert "《" in c.tokens("《流浪地球》")
    assert not any(all(not ch.isalnum() for ch in w) for w in load_stopwords())


def test_user_dict_extra_stopwords_keep_words(tmp_path):
    d = tmp_path / "dict.txt"
    d.write_text("流浪地球 100 nz\n撸铁 100 v\n", encoding="utf-8")
    c = TextCleaner(CleanConfig(user_dict=str(d)))
    assert "流浪地球" in c.tokens(WEIBO)
    assert c.clean("去健身房撸铁") == "健身房 撸铁"
    assert TextCleaner().clean("去健身房撸铁") == "健身房 撸 铁"  # default dictionary untouched
    assert c.fingerprint() != TextCleaner().fingerprint()
    assert "电影" not in clean_text("看电影", CleanConfig(extra_stopwords=("电影",)))
    assert clean_text("看电影", CleanConfig(keep_words=("看",))) == "看 电影"


def test_join_with_and_english_stopwords_case_insensitive():
    assert clean_text("The Movie AND the IMAX", CleanConfig(join_with="|")) == "Movie|IMAX"


def test_config_validation():
    with pytest.raises(ValueError, match="unknown stopword source"):
        CleanConfig(stopword_sources=("nope",))
    with pytest.raises(TypeError):
        CleanConfig(extra_stopwords="电影")


def test_pystopwords_source_if_installed():
    pytest.importorskip("pystopwords")
    c = TextCleaner(CleanConfig(stopword_sources=("stopwordsiso-zh", "stopwordsiso-en", "pystopwords-zh")))
    assert len(load_stopwords(c.cfg)) > len(load_stopwords())
    assert "今天" not in c.tokens("今天看电影") and "今天" in TextCleaner().tokens("今天看电影")


def test_fingerprint_is_stable_and_config_sensitive(cleaner):
    assert cleaner.fingerprint() == TextCleaner().fingerprint() == TextCleaner(CleanConfig()).fingerprint()
    assert len(cleaner.fingerprint()) == 16
    fps = {TextCleaner(CleanConfig(**{k: False})).fingerprint() for k, _, _ in OFF_CASES}
    assert len(fps) == len(OFF_CASES) and cleaner.fingerprint() not in fps


def test_pickle_and_threads_give_identical_results(cleaner):
    texts = [WEIBO, "🍜🍜好吃", "今天在健身房撸铁💪", "期末考试#考研加油#"] * 25
    expected = [cleaner.clean(t) for t in texts]
    assert [pickle.loads(pickle.dumps(cleaner)).clean(t) for t in texts] == expected
    with ThreadPoolExecutor(8) as ex:
        assert list(ex.map(TextCleaner().clean, texts)) == expected


def test_jieba_is_quiet_in_a_fresh_process():
    code = "from sgmft.ingest.text import clean_text; print(clean_text('今天在影城看电影'))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "今天 影城 电影\n"
    assert res.stderr == ""


def test_non_string_input_rejected(cleaner):
    with pytest.raises(TypeError):
        cleaner.clean(123)
