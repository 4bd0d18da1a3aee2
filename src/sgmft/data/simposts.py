"""SimPosts: a synthetic corpus of Weibo-like *raw* posts (Chinese text + image files).

It exercises the raw-post pipeline end to end (manifest -> text cleaning -> image loading ->
features) without the paper's private dataset. :func:`generate_simposts` writes::

    out_dir/manifest.jsonl       the posts, in the documented manifest format
    out_dir/images/              the image files (JPEG/PNG; exotic formats when dirty)
    out_dir/truth.jsonl          per post: true label, regime, which image is informative
    out_dir/simposts.json        the generator config
    out_dir/dirty_truth.json     (dirty=True) every planted problem and its expected outcome

Each post has a *regime* (as in the feature-level benchmark): ``both`` modalities carry the
class, only ``text``, only ``image``, or ``neither``. Uninformative text is generic filler;
an uninformative image shows another class (``misleading_image``) or noise. Texts come from
per-class vocabularies with realistic Weibo noise (reposts, mentions, URLs, emoticons,
hashtags, emoji, full-width punctuation); images are drawn scenes whose palette and shapes
depend on the class. Users have their own class mix; some posts have 2-4 images of which
at most one is informative. Everything is deterministic by ``seed``.
"""

from __future__ import annotations

from sgmft.errors import InputError  # noqa: E402,I001  (user errors: SgmftError and ValueError)

import io
import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sgmft.atomic import write_text
from sgmft.labels import DEFAULT_LABELS

__all__ = ["SimPostsConfig", "generate_simposts", "REGIMES", "DIRTY_EXPECT"]

REGIMES = ("both", "text", "image", "neither")
DIRTY_EXPECT = ("reject_row", "reject_image", "valid_exotic", "empty_text")
_FORMAT_VERSION = 1

# -- vocabularies -----------------------------------------------------------------------------
VOCAB: dict[str, tuple[str, ...]] = {
    "home": ("家", "回家", "沙发", "卧室", "客厅", "厨房", "做饭", "宅家", "被窝", "睡觉", "追剧",
             "猫咪", "狗狗", "阳台", "窗帘", "床", "洗衣服", "打扫", "家务", "外卖", "老妈", "爸妈",
             "懒觉", "家里", "台灯", "绿植", "装修", "搬家", "温馨", "小窝", "居家", "拖鞋"),
    "work": ("上班", "加班", "公司", "办公室", "会议", "开会", "老板", "同事", "项目", "报告", "PPT",
             "电脑", "工位", "打卡", "下班", "出差", "客户", "方案", "邮件", "工作", "周报", "领导",
             "面试", "键盘", "写字楼", "年终总结", "KPI", "deadline", "摸鱼", "通勤", "职场", "工资"),
    "school": ("学校", "上课", "老师", "同学", "考试", "作业", "图书馆", "教室", "宿舍", "食堂",
               "期末", "复习", "论文", "课本", "校园", "操场", "毕业", "开学", "自习", "考研", "学霸",
               "军训", "班级", "黑板", "笔记", "学期", "社团", "导师", "实验室", "答辩", "四六级", "校门"),
    "restaurant": ("餐厅", "好吃", "美食", "火锅", "烧烤", "小龙虾", "菜单", "服务员", "点菜", "牛排",
                   "寿司", "拉面", "甜品", "奶茶", "下午茶", "聚餐", "大餐", "味道", "探店", "排队",
                   "招牌菜", "人均", "麻辣", "川菜", "日料", "自助餐", "饭店", "餐馆", "红烧肉",
                   "吃货", "干饭", "米其林"),
    "cinema": ("电影", "电影院", "影院", "影城", "爆米花", "IMAX", "首映", "票房", "导演", "主演",
               "影评", "3D", "预告片", "彩蛋", "大银幕", "观影", "场次", "电影票", "剧情", "特效",
               "演员", "科幻片", "动画片", "悬疑", "结局", "泪目", "排片", "杜比", "首映礼", "影厅",
               "上映", "续集"),
    "gym": ("健身", "健身房", "跑步", "撸铁", "瑜伽", "深蹲", "卧推", "私教", "减脂", "增肌", "有氧",
            "力量训练", "哑铃", "杠铃", "跑步机", "举重", "汗水", "体脂", "蛋白粉", "腹肌", "拉伸",
            "动感单车", "游泳", "教练", "训练", "马甲线", "燃脂", "器械", "运动", "肌肉", "平板支撑",
            "热身"),
    "shopping": ("逛街", "购物", "商场", "打折", "专柜", "试穿", "买买买", "剁手", "优惠", "折扣",
                 "新款", "衣服", "鞋子", "包包", "口红", "化妆品", "收银台", "购物袋", "奥莱",
                 "万达广场", "优衣库", "店员", "会员卡", "满减", "双十一", "试衣间", "种草", "拔草",
                 "太古里", "超市", "钱包", "血拼"),
    "travel": ("旅行", "旅游", "机场", "飞机", "高铁", "酒店", "景点", "风景", "海边", "爬山", "古镇",
               "自驾", "攻略", "门票", "导游", "度假", "行李箱", "签证", "出发", "拍照", "日落", "沙滩",
               "雪山", "民宿", "游客", "护照", "航班", "登机", "看海", "旅途", "远方", "打卡圣地"),
}
TOPICS: dict[str, tuple[str, ...]] = {
    "home": ("宅家日常", "居家生活", "我的小窝"), "work": ("打工人", "加班日常", "职场那些事"),
    "school": ("校园生活", "期末考试", "考研加油"), "restaurant": ("美食探店", "吃货日常", "今天吃什么"),
    "cinema": ("周末观影", "电影推荐", "今日观影"), "gym": ("健身打卡", "自律生活", "运动打卡"),
    "shopping": ("剁手党", "购物分享", "好物推荐"), "travel": ("旅行日记", "说走就走的旅行", "周末去哪儿"),
}
EMOJI: dict[str, tuple[str, ...]] = {
    "home": ("🏠", "🛋️", "🐱"), "work": ("💼", "💻", "📊"), "school": ("📚", "✏️", "🎓"),
    "restaurant": ("🍜", "🍲", "🍣", "🍰"), "cinema": ("🎬", "🍿", "🎞️"), "gym": ("💪", "🏋️", "🏃"),
    "shopping": ("🛍️", "👗", "💄"), "travel": ("✈️", "🏖️", "🗺️", "⛰️"),
}
FILLER = ("今天", "心情", "不错", "开心", "无聊", "好累", "天气", "真好", "终于", "感觉", "生活",
          "日常", "分享", "随手拍", "记录", "美好", "晚安", "早安", "加油", "幸福", "纪念", "发呆",
          "想念", "快乐", "期待", "时光", "阳光", "下雨", "宝藏", "冲鸭", "emmm", "yyds")
GENERIC_TOPICS = ("日常", "随手拍", "今日份快乐", "晒图", "生活碎片", "好心情")
GENERIC_EMOJI = ("😂", "😊", "🥰", "😭", "👍", "✨", "🌸", "😄")
EMOTICONS = ("[doge]", "[哈哈]", "[喵喵]", "[笑cry]", "[允悲]", "[二哈]", "[泪]", "[心]", "[赞]",
             "[good]", "[抱抱]", "[偷笑]", "[吃瓜]", "[太开心]")
NICKNAMES = ("小明", "小红", "阿杰", "电影君", "吃货小王", "健身达人Leo", "旅行的猫", "购物狂Amy",
             "学霸小李", "打工人阿强", "宅女小美", "路人甲", "Kevin_99", "momo酱", "大白", "橙子")
REPOST_COMMENTS = ("哈哈", "同感", "想去", "转发微博", "说得对", "马住", "太真实了", "羡慕", "冲", "")
_FRAMES = ("{}", "在{}", "去{}", "{}真不错", "今天{}", "又是{}的一天", "和朋友一起{}", "终于{}了",
           "{}太棒了", "第一次{}", "{}打卡", "说到{}", "{}好评", "周末{}")
_FILLER_FRAMES = ("{}", "{}啊", "真的{}", "有点{}", "{}~")
_SEPS = ("，", "，", "！", "。", " ", "~", "……", "、")
_ENDS = ("", "！", "！！", "。", "~", "？", "!!!", "～～")

# -- image palettes: (background top, background bottom, foreground) per class ------------------
_PALETTE: dict[str, tuple[tuple[int, int, int], ...]] = {
    "home": ((235, 215, 180), (200, 160, 120), (150, 90, 50)),
    "work": ((175, 185, 200), (120, 130, 150), (60, 90, 140)),
    "school": ((45, 95, 65), (30, 70, 50), (235, 235, 225)),
    "restaurant": ((205, 70, 45), (235, 155, 70), (245, 240, 230)),
    "cinema": ((20, 15, 30), (45, 20, 40), (245, 240, 215)),
    "gym": ((95, 95, 100), (50, 50, 55), (200, 35, 35)),
    "shopping": ((245, 185, 205), (200, 125, 185), (250, 215, 60)),
    "travel": ((120, 180, 240), (80, 150, 80), (110, 110, 135)),
}


@dataclass
class SimPostsConfig:
    """Size, regimes, noise and dirtiness of a SimPosts corpus."""

    num_posts: int = 400
    num_users: int = 20
    image_size: int = 96
    p_both: float = 0.5           # regime probabilities (must sum to 1)
    p_text: float = 0.2
    p_image: float = 0.2
    p_neither: float = 0.1
    label_noise: float = 0.05     # recorded label replaced by a random other class
    multi_image_fraction: float = 0.2  # posts with 2..max_images images (one may be informative)
    max_images: int = 4
    no_image_fraction: float = 0.03    # text-only posts (regime both->text, image->neither)
    misleading_image: float = 0.5      # uninformative image: another class's scene, else noise
    user_alpha: float = 0.5       # Dirichlet concentration of a user's class mix (small = focused)
    text_noise: float = 1.0       # scales the rates of reposts/mentions/URLs/emoticons/hashtags/emoji
    image_noise: float = 18.0     # per-pixel Gaussian noise (std, 0-255 scale)
    png_fraction: float = 0.2     # share of images saved as PNG (the rest JPEG)
    split: tuple[float, float, float] | None = (0.7, 0.1, 0.2)  # stratified train/val/test; None = no field
    dirty: bool = False
    seed: int = 0

    def validate(self) -> "SimPostsConfig":
        ps = (self.p_both, self.p_text, self.p_image, self.p_neither)
        if min(ps) < 0 or abs(sum(ps) - 1.0) > 1e-6:
            raise InputError(f"p_both+p_text+p_image+p_neither must be 1 (non-negative), got {ps}")
        if self.num_posts < 1 or self.num_users < 1 or self.image_size < 16 or self.max_images < 2:
            raise InputError("need num_posts >= 1, num_users >= 1, image_size >= 16, max_images >= 2")
        if self.dirty and self.num_posts < 30:
            raise InputError("dirty=True plants ~20 problems; it needs num_posts >= 30")
        if self.split is not None and (len(self.split) != 3 or abs(sum(self.split) - 1) > 1e-6):
            raise InputError(f"split must be three fractions summing to 1, got {self.split}")
        return self


# -- text -------------------------------------------------------------------------------------
def _sentence(r: random.Random, cls: str | None) -> str:
    """A short post body: class words in frames (cls=None: generic filler only)."""
    frags = []
    if cls is not None:
        frags += [r.choice(_FRAMES).format(w) for w in r.sample(VOCAB[cls], r.randint(2, 4))]
    frags += [r.choice(_FILLER_FRAMES).format(w) for w in r.sample(FILLER, r.randint(1 if cls else 2, 3))]
    r.shuffle(frags)
    out = frags[0]
    for f in frags[1:]:
        out += r.choice(_SEPS) + f
    return out + r.choice(_ENDS)


def _make_text(r: random.Random, cls: str | None, noise: float) -> str:
    """A Weibo-like text about ``cls`` (None: uninformative) with noise decorations."""
    if cls is None and r.random() < 0.1:  # pure noise that cleans to "" (a natural empty text)
        return r.choice(("转发微博", "[哈哈][哈哈]", "", "[doge]" + r.choice(GENERIC_EMOJI) * 2, "分享图片"))
    text = _sentence(r, cls)
    p = lambda base: r.random() < min(1.0, base * noise)  # noqa: E731
    if p(0.35):
        cuts = [0, len(text)] + [k + 1 for k, ch in enumerate(text) if ch in "，！。 ~、…？!～"]
        i = r.choice(cuts)  # at a phrase boundary, as people type them
        text = text[:i] + "".join(r.sample(EMOTICONS, r.randint(1, 2))) + text[i:]
    if p(0.3):
        e = r.choice(EMOJI[cls] if cls else GENERIC_EMOJI) * r.randint(1, 3)
        text = e + text if r.random() < 0.4 else text + e
    if p(0.3):
        tag = "#" + r.choice(TOPICS[cls] if cls else GENERIC_TOPICS) + "#"
        text = f"{tag}{text}" if r.random() < 0.5 else f"{text} {tag}"
    if p(0.25):
        nick = r.choice(NICKNAMES)
        text = r.choice((f"{text} @{nick}", f"和@{nick} {text}", f"@{nick} {text}"))
    if p(0.15):
        link = "http://t.cn/" + "".join(r.choices("ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789", k=7))
        text += r.choice((" " + link, link, " 网页链接"))
    if p(0.2):  # a repost: own comment //@original author: original text (chains of 1-2 hops)
        hops = [f"//@{r.choice(NICKNAMES)}:{text}"]
        if r.random() < 0.3:
            hops.insert(0, f"//@{r.choice(NICKNAMES)}:{r.choice(REPOST_COMMENTS)}")
        text = r.choice(REPOST_COMMENTS) + "".join(hops)
    return text


# -- images -----------------------------------------------------------------------------------
def _jitter(rng: np.random.Generator, c: tuple[int, int, int], s: float = 14.0) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(np.asarray(c) + rng.normal(0, s, 3), 0, 255))


def _gradient(rng: np.random.Generator, top, bottom, size: int) -> Image.Image:
    t = np.linspace(0, 1, size)[:, None, None]
    a = (1 - t) * np.asarray(_jitter(rng, top), float) + t * np.asarray(_jitter(rng, bottom), float)
    return Image.fromarray(np.repeat(a, size, axis=1).astype(np.uint8), "RGB")


def _scene(rng: np.random.Generator, cls: str, S: int, noise: float) -> Image.Image:
    """A drawn scene whose palette and shapes depend on ``cls``."""
    top, bottom, fg = _PALETTE[cls]
    im = _gradient(rng, top, bottom, S)
    d = ImageDraw.Draw(im)
    u = lambda a, b: int(rng.uniform(a, b) * S)  # noqa: E731
    fgc = _jitter(rng, fg)
    if cls == "home":  # houses: a body, a roof, a window
        for _ in range(rng.integers(1, 3)):
            x, y, w = u(0.05, 0.55), u(0.4, 0.6), u(0.25, 0.4)
            d.rectangle([x, y, x + w, y + w * 3 // 4], fill=fgc)
            d.polygon([(x - w // 8, y), (x + w + w // 8, y), (x + w // 2, y - w // 2)], fill=_jitter(rng, (180, 60, 40)))
            d.rectangle([x + w // 3, y + w // 5, x + 2 * w // 3, y + w // 2], fill=_jitter(rng, (250, 230, 150)))
    elif cls == "work":  # a grid of windows / screens
        n = int(rng.integers(3, 6))
        g, light = S // n, _jitter(rng, (205, 225, 245))
        for i in range(n):
            for j in range(n):
                if rng.random() < 0.8:
                    d.rectangle([i * g + 2, j * g + 2, i * g + g - 3, j * g + g * 2 // 3], fill=fgc if (i + j) % 2 else light)
    elif cls == "school":  # chalk lines on a board
        for _ in range(int(rng.integers(4, 8))):
            y = u(0.1, 0.9)
            d.line([u(0.05, 0.2), y, u(0.5, 0.95), y], fill=fgc, width=max(1, S // 48))
        d.rectangle([0, S - S // 10, S, S], fill=_jitter(rng, (130, 90, 60)))
    elif cls == "restaurant":  # plates with food
        for _ in range(rng.integers(1, 4)):
            cx, cy, r = u(0.2, 0.8), u(0.2, 0.8), u(0.12, 0.25)
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fgc)
            r2 = int(r * 0.6)
            d.ellipse([cx - r2, cy - r2, cx + r2, cy + r2], fill=_jitter(rng, (190, 110, 40), 30))
    elif cls == "cinema":  # a bright screen above rows of red seats
        d.rectangle([u(0.05, 0.15), u(0.05, 0.12), u(0.85, 0.95), u(0.4, 0.5)], fill=fgc)
        for row in range(3):
            y = int(S * (0.62 + 0.12 * row))
            for x in range(S // 16, S, S // 8):
                d.ellipse([x - S // 40, y - S // 40, x + S // 40, y + S // 40], fill=_jitter(rng, (170, 20, 30)))
    elif cls == "gym":  # dumbbells over diagonal stripes
        for k in range(-S, S, S // 6):
            d.line([k, S, k + S, 0], fill=_jitter(rng, (75, 75, 80)), width=max(1, S // 32))
        for _ in range(rng.integers(1, 3)):
            y, x0, x1 = u(0.25, 0.75), u(0.1, 0.25), u(0.75, 0.9)
            d.rectangle([x0, y - S // 60, x1, y + S // 60], fill=(30, 30, 30))
            for x in (x0, x1 - S // 12):
                d.rectangle([x, y - S // 8, x + S // 12, y + S // 8], fill=fgc)
    elif cls == "shopping":  # many coloured bags with handles
        for _ in range(rng.integers(3, 7)):
            x, y, w = u(0.0, 0.8), u(0.3, 0.8), u(0.12, 0.22)
            c = _jitter(rng, ((250, 215, 60), (60, 180, 220), (240, 90, 150), (120, 200, 120))[rng.integers(4)], 20)
            d.rectangle([x, y, x + w, y + w], fill=c)
            d.arc([x + w // 4, y - w // 3, x + 3 * w // 4, y + w // 3], 180, 360, fill=(40, 40, 40), width=max(1, S // 64))
    elif cls == "travel":  # sun and mountains over green land
        r = u(0.06, 0.1)
        cx, cy = u(0.6, 0.9), u(0.08, 0.25)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_jitter(rng, (250, 220, 80)))
        for _ in range(rng.integers(2, 4)):
            px, h = u(0.1, 0.9), u(0.3, 0.55)
            base = int(S * 0.7)
            d.polygon([(px - h, base), (px + h, base), (px, base - h)], fill=fgc)
            d.polygon([(px - h // 5, base - h + h // 5), (px + h // 5, base - h + h // 5), (px, base - h)], fill=(245, 245, 250))
    return _add_noise(rng, im, noise)


def _noise_image(rng: np.random.Generator, S: int, noise: float) -> Image.Image:
    """An uninformative picture: a smooth random colour field with random blobs."""
    grid = Image.fromarray(rng.integers(40, 220, (4, 4, 3)).astype(np.uint8), "RGB")
    im = grid.resize((S, S), Image.Resampling.BILINEAR)
    d = ImageDraw.Draw(im)
    for _ in range(rng.integers(0, 5)):
        x, y, r = (int(v) for v in rng.uniform(0, 1, 3) * [S, S, S / 4])
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return _add_noise(rng, im, noise * 1.5)


def _add_noise(rng: np.random.Generator, im: Image.Image, std: float) -> Image.Image:
    if std <= 0:
        return im
    a = np.asarray(im, dtype=np.float32) + rng.normal(0, std, (im.height, im.width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def _jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=88, **kw)
    return buf.getvalue()


# -- dirty plants -----------------------------------------------------------------------------
_IMAGE_PLANTS = ("corrupt_image", "truncated_jpeg", "zero_byte")
_EXOTIC_PLANTS = ("palette_png", "rgba_png", "cmyk_jpeg", "gray16_png", "animated_gif",
                  "exif_rotated_jpeg", "gray_jpeg", "unicode_path")
_ROW_PLANTS = (("malformed_json", "json"), ("duplicate_id", "id"), ("unknown_label", "label"),
               ("missing_image", "images"), ("bad_split", "split"), ("images_not_list", "images"),
               ("missing_id", "id"))


def _save_exotic(kind: str, im: Image.Image, rng: np.random.Generator, other: Image.Image,
                 img_dir: Path, stem: str) -> tuple[str, dict]:
    """Save ``im`` in an exotic-but-valid form; return (file name, facts for the truth file)."""
    if kind == "palette_png":
        name = f"{stem}.png"
        im.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(img_dir / name)
        return name, {"mode": "P"}
    if kind == "rgba_png":
        name = f"{stem}.png"
        a = im.convert("RGBA")
        alpha = np.full((im.height, im.width), 255, np.uint8)
        alpha[: im.height // 6] = 0  # a transparent top band
        a.putalpha(Image.fromarray(alpha, "L"))
        a.save(img_dir / name)
        return name, {"mode": "RGBA"}
    if kind == "cmyk_jpeg":
        name = f"{stem}.jpg"
        (img_dir / name).write_bytes(_jpeg_bytes(im.convert("CMYK")))
        return name, {"mode": "CMYK"}
    if kind == "gray16_png":
        name = f"{stem}.png"
        a = np.asarray(im.convert("L")).astype(np.uint16) * 257  # spans 0..65535
        Image.fromarray(a).save(img_dir / name)
        return name, {"mode": "I;16", "note": "16-bit: a naive convert('RGB') saturates to white"}
    if kind == "animated_gif":
        name = f"{stem}.gif"
        im.save(img_dir / name, save_all=True, append_images=[other, im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)],
                duration=200, loop=0)
        return name, {"mode": "P", "n_frames": 3, "note": "frame 0 is the informative one"}
    if kind == "exif_rotated_jpeg":
        name = f"{stem}.jpg"
        upright = im.crop((0, 0, im.width, im.height * 3 // 4))  # landscape, so rotation is visible
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 deg clockwise to display"
        (img_dir / name).write_bytes(_jpeg_bytes(upright.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes()))
        return name, {"mode": "RGB", "exif_orientation": 6, "display_size": list(upright.size)}
    if kind == "gray_jpeg":
        name = f"{stem}.jpg"
        (img_dir / name).write_bytes(_jpeg_bytes(im.convert("L")))
        return name, {"mode": "L"}
    if kind == "unicode_path":
        name = f"街拍 图片_{stem}.jpg"
        (img_dir / name).write_bytes(_jpeg_bytes(im))
        return name, {"mode": "RGB", "note": "non-ASCII file name with a space"}
    raise InputError(kind)


def _save_broken(kind: str, im: Image.Image, rng: np.random.Generator, path: Path) -> None:
    if kind == "corrupt_image":
        path.write_bytes(b"NOTJPEG" + rng.integers(0, 256, 2048).astype(np.uint8).tobytes())
    elif kind == "truncated_jpeg":
        data = _jpeg_bytes(im)
        path.write_bytes(data[: int(len(data) * 0.55)])
    elif kind == "zero_byte":
        path.write_bytes(b"")
    else:
        raise InputError(kind)


# -- generator --------------------------------------------------------------------------------
_OUR_FILES = ("manifest.jsonl", "truth.jsonl", "simposts.json", "dirty_truth.json")



def _prepare_dir(out: Path, overwrite: bool) -> Path:
    """``out/images`` made empty; an existing corpus is removed only with ``overwrite``."""
    img_dir = out / "images"
    existing = [out / f for f in _OUR_FILES if (out / f).exists()] + ([img_dir] if img_dir.exists() else [])
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a corpus ({existing[0].name}); pass overwrite=True")
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    img_dir.mkdir(parents=True)
    return img_dir


def _draw_posts(cfg: SimPostsConfig, r: random.Random, rng: np.random.Generator, labels: list[str]) -> list[dict]:
    """Pass 1: the structure (user, class, regime, image count, noisy label) and text of every post."""
    K = len(labels)
    mixes = rng.dirichlet([cfg.user_alpha] * K, size=cfg.num_users)
    posts: list[dict] = []
    for i in range(cfg.num_posts):
        u = int(rng.integers(cfg.num_users))
        true = int(rng.choice(K, p=mixes[u]))
        regime = REGIMES[int(rng.choice(4, p=[cfg.p_both, cfg.p_text, cfg.p_image, cfg.p_neither]))]
        if rng.random() < cfg.no_image_fraction:
            n_img = 0
            regime = {"both": "text", "image": "neither"}.get(regime, regime)
        else:
            n_img = int(rng.integers(2, cfg.max_images + 1)) if rng.random() < cfg.multi_image_fraction else 1
        label = true
        if rng.random() < cfg.label_noise:
            label = int((true + rng.integers(1, K)) % K)
        txt_inf, img_inf = regime in ("both", "text"), regime in ("both", "image")
        posts.append(dict(
            id=f"wb{cfg.seed:03d}{i:06d}", user=f"u{u:03d}", true=true, label=label, regime=regime,
            text=_make_text(r, labels[true] if txt_inf else None, cfg.text_noise),
            n_img=n_img, key=int(rng.integers(n_img)) if n_img else None, img_inf=img_inf, txt_inf=txt_inf,
            split=None, images=[]))
    return posts


def _assign_splits(posts: list[dict], split: tuple[float, float, float], r: random.Random, K: int) -> None:
    """Train/val/test, stratified by the recorded label."""
    for c in range(K):
        idx = [k for k, p in enumerate(posts) if p["label"] == c]
        r.shuffle(idx)
        n_test, n_val = round(len(idx) * split[2]), round(len(idx) * split[1])
        for j, k in enumerate(idx):
            posts[k]["split"] = "test" if j < n_test else "val" if j < n_test + n_val else "train"


def _plant_post_problems(posts: list[dict], r: random.Random) -> tuple[dict[int, str], list[dict]]:
    """Dirty plants on existing posts: image content problems, exotic formats, an empty text.
    Returns (post index -> image plant, truth items so far)."""
    plants: dict[int, str] = {}
    with_img = [k for k, p in enumerate(posts) if p["n_img"]]
    informative = [k for k in with_img if posts[k]["img_inf"]] or with_img
    chosen = r.sample(informative, min(len(informative), len(_EXOTIC_PLANTS)))
    plants.update(zip(chosen, _EXOTIC_PLANTS))
    rest = [k for k in with_img if k not in plants]
    plants.update(zip(r.sample(rest, min(len(rest), len(_IMAGE_PLANTS))), _IMAGE_PLANTS))
    if len(plants) < len(_EXOTIC_PLANTS) + len(_IMAGE_PLANTS) or len(plants) == len(posts):
        raise InputError("too few posts with images to plant every problem; raise num_posts "
                         "or lower no_image_fraction")
    k_empty = r.choice([k for k in range(len(posts)) if k not in plants])
    p = posts[k_empty]
    p["text"] = "转发微博[哈哈][哈哈] http://t.cn/A6b3x9Q @" + r.choice(NICKNAMES) + " 🍜🍜"
    p["txt_inf"] = False
    p["regime"] = {"both": "image", "text": "neither"}.get(p["regime"], p["regime"])
    return plants, [{"kind": "empty_text_after_cleaning", "expect": "empty_text", "id": p["id"]}]


def _post_image(p: dict, j: int, cfg: SimPostsConfig, rng: np.random.Generator, labels: list[str]) -> Image.Image:
    """Image ``j`` of post ``p``: its class's scene (the key image of an image-informative post),
    else another class's scene (``misleading_image``) or noise."""
    K, S = len(labels), cfg.image_size
    if j == p["key"] and p["img_inf"]:
        return _scene(rng, labels[p["true"]], S, cfg.image_noise)
    if rng.random() < cfg.misleading_image:
        other = (p["true"] + int(rng.integers(1, K))) % K
        return _scene(rng, labels[other], S, cfg.image_noise)
    return _noise_image(rng, S, cfg.image_noise)


def _save_planted(kind: str, im: Image.Image, p: dict, stem: str, cfg: SimPostsConfig, rng: np.random.Generator,
                  img_dir: Path, truth_items: list[dict]) -> str:
    """Save a planted image (exotic but valid, or broken); record it in ``truth_items``; its file name."""
    if kind in _EXOTIC_PLANTS:
        name, facts = _save_exotic(kind, im, rng, _noise_image(rng, cfg.image_size, cfg.image_noise), img_dir, stem)
        truth_items.append({"kind": kind, "expect": "valid_exotic", "id": p["id"], "image": f"images/{name}", **facts})
        return name
    name = f"{stem}.jpg"
    _save_broken(kind, im, rng, img_dir / name)
    truth_items.append({"kind": kind, "expect": "reject_image", "id": p["id"], "image": f"images/{name}"})
    return name


def _draw_images(posts: list[dict], plants: dict[int, str], truth_items: list[dict], cfg: SimPostsConfig,
                 rng: np.random.Generator, labels: list[str], img_dir: Path) -> None:
    """Pass 2: every post's images, written to ``img_dir`` (planted ones as :func:`_save_planted`)."""
    for k, p in enumerate(posts):
        for j in range(p["n_img"]):
            im = _post_image(p, j, cfg, rng, labels)
            stem = f"{p['id']}_{j}"
            kind = plants.get(k)
            target_j = p["key"] if kind in _EXOTIC_PLANTS else (p["n_img"] - 1)
            if kind is not None and j == target_j:
                name = _save_planted(kind, im, p, stem, cfg, rng, img_dir, truth_items)
            elif rng.random() < cfg.png_fraction:
                name = f"{stem}.png"
                im.save(img_dir / name, optimize=False)
            else:
                name = f"{stem}.jpg"
                (img_dir / name).write_bytes(_jpeg_bytes(im))
            p["images"].append(f"images/{name}")


def _record(p: dict, labels: list[str]) -> dict:
    """A post's manifest record."""
    d = {"id": p["id"], "user": p["user"], "text": p["text"], "images": p["images"], "label": labels[p["label"]]}
    if p["split"] is not None:
        d["split"] = p["split"]
    return d


def _spoil(base: dict, kind: str, n: int, item: dict) -> str:
    """The manifest line of a planted bad row of ``kind`` (all but ``duplicate_id``) made from ``base``."""
    if kind == "malformed_json":
        item["id"] = None
        return json.dumps(base, ensure_ascii=False)[:-12]
    if kind == "unknown_label":
        base["label"] = "library"
    elif kind == "missing_image":
        base["images"] = [f"images/missing_{n:04d}.jpg"]
    elif kind == "bad_split":
        base["split"] = "holdout"
    elif kind == "images_not_list":
        base["images"] = {"path": base["images"][0] if base["images"] else "images/x.jpg"}
    elif kind == "missing_id":
        del base["id"]
        item["id"] = None
    return json.dumps(base, ensure_ascii=False)


def _plant_bad_rows(lines: list[tuple[str, dict | None]], posts: list[dict], labels: list[str], seed: int,
                    r: random.Random) -> None:
    """Insert the planted bad rows (:data:`_ROW_PLANTS`) into ``lines`` at seeded positions; each
    carries its truth item (``None`` for the posts' own lines)."""
    for n, (kind, field) in enumerate(_ROW_PLANTS):
        base = _record(posts[r.randrange(len(posts))], labels)
        base["id"] = f"wb{seed:03d}x{n:05d}"
        item = {"kind": kind, "expect": "reject_row", "id": base["id"], "field": field}
        if kind == "duplicate_id":
            src = r.randrange(len(posts))
            base["id"] = item["id"] = posts[src]["id"]
            first = next(n for n, (t, it) in enumerate(lines) if it is None and json.loads(t)["id"] == posts[src]["id"])
            lines.insert(r.randint(first + 1, len(lines)), (json.dumps(base, ensure_ascii=False), item))  # after it
            continue
        text = _spoil(base, kind, n, item)
        lines.insert(r.randint(0, len(lines)), (text, item))


def _write_sidecars(out: Path, posts: list[dict], labels: list[str], line_of: dict, cfg: SimPostsConfig,
                    truth_items: list[dict]) -> None:
    """truth.jsonl, simposts.json and (dirty) dirty_truth.json."""
    with open(out / "truth.jsonl", "w", encoding="utf-8") as f:
        for p in posts:
            f.write(json.dumps({"id": p["id"], "line": line_of[p["id"]], "user": p["user"],
                                "label": labels[p["label"]], "true_label": labels[p["true"]],
                                "regime": p["regime"], "text_informative": p["txt_inf"],
                                "image_informative": p["img_inf"] and p["n_img"] > 0,
                                "key_image": p["key"], "num_images": p["n_img"]}, ensure_ascii=False) + "\n")
    (out / "simposts.json").write_text(json.dumps(
        {"format": "sgmft-simposts", "version": _FORMAT_VERSION, "config": asdict(cfg),
         "label_names": labels}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if cfg.dirty:
        truth_items.sort(key=lambda it: it["line"])
        (out / "dirty_truth.json").write_text(json.dumps(
            {"format": "sgmft-simposts-dirty-truth", "version": _FORMAT_VERSION, "manifest": "manifest.jsonl",
             "expect_values": list(DIRTY_EXPECT), "items": truth_items}, indent=1, ensure_ascii=False) + "\n",
            encoding="utf-8")


def generate_simposts(out_dir: str | Path, cfg: SimPostsConfig | None = None, overwrite: bool = False) -> Path:
    """Write a SimPosts corpus to ``out_dir``; return the manifest path.

    Refuses to touch an existing corpus unless ``overwrite`` (which removes only the files
    this generator writes and its ``images/`` folder). The draws happen in a fixed order
    (posts, splits, plants, images, bad rows), so a seed gives the same corpus byte for byte.
    """
    cfg = (cfg or SimPostsConfig()).validate()
    out = Path(out_dir)
    img_dir = _prepare_dir(out, overwrite)
    r = random.Random(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    labels = list(DEFAULT_LABELS)
    posts = _draw_posts(cfg, r, rng, labels)
    if cfg.split is not None:
        _assign_splits(posts, cfg.split, r, len(labels))
    plants, truth_items = _plant_post_problems(posts, r) if cfg.dirty else ({}, [])
    _draw_images(posts, plants, truth_items, cfg, rng, labels, img_dir)
    lines: list[tuple[str, dict | None]] = [(json.dumps(_record(p, labels), ensure_ascii=False), None) for p in posts]
    if cfg.dirty:
        _plant_bad_rows(lines, posts, labels, cfg.seed, r)
        truth_items += [dict(item, line=ln) for ln, (_, item) in enumerate(lines, start=1) if item is not None]
    line_of = {json.loads(t)["id"]: n for n, (t, it) in enumerate(lines, start=1) if it is None}
    for item in truth_items:
        if "line" not in item:
            item["line"] = line_of[item["id"]]
    # sidecars first, the manifest last (atomic), so a crash never leaves a manifest without images
    _write_sidecars(out, posts, labels, line_of, cfg, truth_items)
    manifest = out / "manifest.jsonl"
    write_text(manifest, "".join(t + "\n" for t, _ in lines))
    return manifest
