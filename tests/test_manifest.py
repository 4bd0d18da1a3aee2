"""sgmft.ingest.manifest: JSONL/CSV parsing, every validation rule, raise vs skip, rejects file."""

from __future__ import annotations

import json

import pytest

from sgmft.ingest.manifest import ManifestError, Post, Reject, _SeenIds, iter_manifest, read_manifest, write_rejects


def _touch(root, *names):
    (root / "img").mkdir(exist_ok=True)
    for n in names:
        (root / "img" / n).write_bytes(b"x")  # content is the image loader's business


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                    encoding="utf-8")
    return path


def test_valid_jsonl_all_field_forms(tmp_path):
    _touch(tmp_path, "a.jpg", "b.png", "c.jpg")
    absolute = str((tmp_path / "img" / "c.jpg").resolve())
    m = _jsonl(tmp_path / "m.jsonl", [
        {"id": "p1", "user": "u1", "text": "今天看电影", "images": ["img/a.jpg", "img/b.png"],
         "label": "Cinema", "split": "train"},
        "",                                                        # blank lines are skipped
        {"id": 2, "text": "", "image": "img/a.jpg", "label": None, "split": "valid", "extra": 1},
        {"id": "p3", "text": "只有文字"},                            # text-only post
        {"id": "p4", "images": [absolute], "user": 7, "split": ""},
    ])
    posts, rejects = read_manifest(m)
    assert rejects == []
    p1, p2, p3, p4 = posts
    assert p1 == Post("p1", "u1", "今天看电影", ((tmp_path / "img/a.jpg").resolve(),
                                                (tmp_path / "img/b.png").resolve()), "cinema", "train", 1)
    assert all(p.is_absolute() for p in p1.images)
    assert (p2.id, p2.user, p2.text, p2.label, p2.split, p2.line) == ("2", "", "", None, "val", 3)
    assert p2.images == ((tmp_path / "img/a.jpg").resolve(),)
    assert (p3.images, p3.text, p3.line) == ((), "只有文字", 4)
    assert (p4.images[0], p4.user, p4.split, p4.text) == ((tmp_path / "img/c.jpg").resolve(), "7", None, "")


def test_valid_csv_with_bom_pipes_and_multiline_field(tmp_path):
    _touch(tmp_path, "a.jpg", "b.jpg")
    m = tmp_path / "m.csv"
    m.write_text('\ufeffid,user,text,images,label,split\n'
                 'p1,u1,"第一行\n第二行",img/a.jpg | img/b.jpg,gym,test\n'
                 'p2,,,,,\n'
                 '\n'
                 'p3,u2,"带,逗号",img/b.jpg,home,\n', encoding="utf-8")
    posts, rejects = read_manifest(m)
    assert rejects == []
    assert [(p.id, p.line) for p in posts] == [("p1", 2), ("p2", 4), ("p3", 6)]
    assert posts[0].text == "第一行\n第二行" and len(posts[0].images) == 2 and posts[0].split == "test"
    assert (posts[1].images, posts[1].label, posts[1].text, posts[1].user) == ((), None, "", "")
    assert posts[2].text == "带,逗号" and posts[2].split is None


def test_csv_single_image_column(tmp_path):
    _touch(tmp_path, "a.jpg")
    m = tmp_path / "m.csv"
    m.write_text("id,text,image\np1,hi,img/a.jpg\n", encoding="utf-8")
    assert read_manifest(m)[0][0].images == ((tmp_path / "img/a.jpg").resolve(),)


BAD_ROWS = [
    ('{"id": "ok1", "text": "fine"}', None),
    ('{"id": "x1", "text": "broken', "json"),
    ('[1, 2]', "json"),
    ('{"text": "no id"}', "id"),
    ('{"id": "  ", "text": "blank id"}', "id"),
    ('{"id": "ok1", "text": "again"}', "id"),
    ('{"id": "x2", "label": "library"}', "label"),
    ('{"id": "x3", "split": "holdout"}', "split"),
    ('{"id": "x4", "images": "img/a.jpg"}', "images"),
    ('{"id": "x5", "images": ["img/a.jpg", 3]}', "images"),
    ('{"id": "x6", "images": ["img/missing.jpg"]}', "images"),
    ('{"id": "x7", "text": 42}', "text"),
    ('{"id": "x8", "user": ["u"]}', "user"),
    ('{"id": true}', "id"),
    ('{"id": "x9", "image": "img/a.jpg", "images": ["img/a.jpg"]}', "images"),
    ('{"id": "x10", "images": [""]}', "images"),
    ('{"id": "x11", "label": 3}', "label"),
]


def _bad_manifest(tmp_path):
    _touch(tmp_path, "a.jpg")
    return _jsonl(tmp_path / "bad.jsonl", [r for r, _ in BAD_ROWS])


def test_raise_lists_every_problem_with_file_and_line(tmp_path):
    m = _bad_manifest(tmp_path)
    with pytest.raises(ManifestError) as ei:
        read_manifest(m)
    err = ei.value
    expected = [(n, f) for n, (_, f) in enumerate(BAD_ROWS, start=1) if f]
    assert [(r.line, r.field) for r in err.rejects] == expected
    msg = str(err)
    for line, field in expected:
        assert f"{m}:{line}: field '{field}':" in msg
    assert "first seen on line 1" in msg
    assert "known: home, work, school, restaurant, cinema, gym, shopping, travel" in msg
    assert "image file not found: img/missing.jpg" in msg
    assert isinstance(err, ValueError)


def test_skip_returns_good_rows_and_writes_rejects(tmp_path):
    m = _bad_manifest(tmp_path)
    out = tmp_path / "sub" / "rejects.jsonl"
    posts, rejects = read_manifest(m, on_error="skip", rejects_path=out)
    assert [p.id for p in posts] == ["ok1"]
    assert len(rejects) == len(BAD_ROWS) - 1
    written = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert written == [r.to_dict() for r in rejects]
    assert set(written[0]) == {"line", "id", "field", "reason", "stage"}
    assert {r.id for r in rejects if r.field == "id" and "duplicate" in r.reason} == {"ok1"}
    assert [p.name for p in out.parent.iterdir()] == ["rejects.jsonl"]  # no temp files left


def test_row_with_several_problems_gives_several_rejects(tmp_path):
    m = _jsonl(tmp_path / "m.jsonl", [{"id": "a", "label": "x", "split": "y", "images": ["nope.jpg"]}])
    _, rejects = read_manifest(m, on_error="skip")
    assert [(r.line, r.id, r.field) for r in rejects] == [(1, "a", "label"), (1, "a", "split"), (1, "a", "images")]


def test_options_check_images_require_labels_label_names(tmp_path):
    m = _jsonl(tmp_path / "m.jsonl", [{"id": "a", "images": ["nope.jpg"], "label": "library"},
                                       {"id": "b"}])
    posts, _ = read_manifest(m, check_images=False, label_names=None)
    assert posts[0].label == "library" and posts[0].images == ((tmp_path / "nope.jpg").resolve(),)
    _, rejects = read_manifest(m, check_images=False, label_names=("library",), require_labels=True,
                               on_error="skip")
    assert [(r.id, r.field) for r in rejects] == [("b", "label")]


def test_error_listing_is_capped(tmp_path):
    m = _jsonl(tmp_path / "m.jsonl", [{"id": f"p{i}", "label": "nope"} for i in range(60)])
    with pytest.raises(ManifestError) as ei:
        read_manifest(m)
    msg = str(ei.value)
    assert msg.count("field 'label'") == 50 and "and 10 more problem(s)" in msg
    assert len(ei.value.rejects) == 60


def test_raise_mode_still_writes_rejects_file(tmp_path):
    m = _jsonl(tmp_path / "m.jsonl", ['{"id": '])
    out = tmp_path / "r.jsonl"
    with pytest.raises(ManifestError):
        read_manifest(m, rejects_path=out)
    assert json.loads(out.read_text())["field"] == "json"


def test_clean_manifest_writes_empty_rejects_file(tmp_path):
    m = _jsonl(tmp_path / "m.jsonl", [{"id": "a"}])
    out = tmp_path / "r.jsonl"
    read_manifest(m, rejects_path=out)
    assert out.read_text() == ""


def test_csv_structural_problems(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("user,text\nu,hi\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"m\.csv:1: field 'id'"):
        read_manifest(m)
    m.write_text("id,text\np1,hi,extra\np2,ok\n", encoding="utf-8")
    posts, rejects = read_manifest(m, on_error="skip")
    assert [p.id for p in posts] == ["p2"] and (rejects[0].line, rejects[0].field) == (2, "csv")


def test_invalid_utf8_line(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_bytes(b'{"id": "a"}\n{"id": "\xff"}\n')
    posts, rejects = read_manifest(m, on_error="skip")
    assert [p.id for p in posts] == ["a"] and rejects[0].line == 2 and "UTF-8" in rejects[0].reason


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "none.jsonl")
    m = _jsonl(tmp_path / "m.jsonl", [{"id": "a"}])
    with pytest.raises(ValueError, match="on_error"):
        read_manifest(m, on_error="ignore")


def test_write_rejects_accepts_dicts_and_replaces(tmp_path):
    out = tmp_path / "r.jsonl"
    write_rejects(out, [Reject(3, "a", "images", "image file not found: x.jpg")])
    write_rejects(out, [{"line": 1, "id": None, "field": "json", "reason": "坏"}])
    assert out.read_text(encoding="utf-8") == '{"line": 1, "id": null, "field": "json", "reason": "坏"}\n'


# -- the streaming reader (iter_manifest): read_manifest is it, collected ------------------------
def _mixed_manifest(tmp_path):
    """The bad rows above between good ones (posts ok0..ok29), so chunks hold both."""
    rows = []
    for i, (bad, _) in enumerate(BAD_ROWS[1:]):
        rows += [{"id": f"ok{2 * i}", "text": "好"}, bad, {"id": f"ok{2 * i + 1}", "split": "test"}]
    return _bad_manifest(tmp_path), _jsonl(tmp_path / "mixed.jsonl", rows)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 32, 10_000])
def test_iter_manifest_chunks_concatenate_to_read_manifest(tmp_path, chunk_size):
    _, m = _mixed_manifest(tmp_path)
    posts, rejects = read_manifest(m, on_error="skip")
    assert len(posts) == 32 and len(rejects) == len(BAD_ROWS) - 1
    chunks = list(iter_manifest(m, chunk_size=chunk_size, on_error="skip"))
    assert all(len(c.posts) == chunk_size for c in chunks[:-1]) and 0 < len(chunks[-1].posts) <= chunk_size
    assert [p for c in chunks for p in c.posts] == posts
    assert [r for c in chunks for r in c.rejects] == rejects
    # each chunk carries the rejects of the rows read since the previous one, with their lines
    for prev, c in zip([None] + chunks, chunks):
        lo = prev.posts[-1].line if prev is not None else 0
        assert all(lo < r.line < c.posts[-1].line for r in c.rejects)


def test_iter_manifest_raise_mode_after_the_last_chunk(tmp_path):
    m, _ = _mixed_manifest(tmp_path)
    it = iter_manifest(m, chunk_size=1)
    first = next(it)
    assert [p.id for p in first.posts] == ["ok1"]
    with pytest.raises(ManifestError) as ei:
        list(it)
    assert [(r.line, r.field) for r in ei.value.rejects] == [(n, f) for n, (_, f) in enumerate(BAD_ROWS, 1) if f]
    assert f"{m}:6: field 'id': duplicate id 'ok1'; first seen on line 1" in str(ei.value)
    with pytest.raises(ValueError, match="chunk_size"):
        next(iter_manifest(m, chunk_size=0))


def test_iter_manifest_csv_streams_with_record_lines(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text('id,text\np1,"一\n二"\np2,x,extra\np1,dup\np3,ok\n', encoding="utf-8")
    chunks = list(iter_manifest(m, chunk_size=1, on_error="skip"))
    assert [[p.id for p in c.posts] for c in chunks] == [["p1"], ["p3"]]
    assert [(r.line, r.field) for r in chunks[1].rejects] == [(4, "csv"), (5, "id")]
    assert "first seen on line 2" in chunks[1].rejects[1].reason


def test_invalid_utf8_in_csv_names_its_line_past_the_first_block(tmp_path):
    m = tmp_path / "m.csv"
    m.write_bytes(b"id,text\n" + b"".join(b"p%d,abcdefghijklmnopqrstuvwxyz\n" % i for i in range(40_000)) + b"q,\xff\n")
    assert m.stat().st_size > 1 << 20                      # the bad byte is in the second 1 MiB block
    with pytest.raises(ManifestError, match=r"m\.csv:40002: field 'csv': not valid UTF-8"):
        read_manifest(m)


def test_duplicate_ids_found_across_many_rows(tmp_path):
    """Past the 16,384 recent ids the check looks in the sorted hash arrays (_SeenIds): repeats of
    early, middle and late ids are all found, with the line of the first one."""
    n = 20_000
    rows = [{"id": f"id{i}"} for i in range(n)] + [{"id": "id0"}, {"id": "id12345"}, {"id": f"id{n - 1}"}]
    m = _jsonl(tmp_path / "m.jsonl", rows)
    posts, rejects = read_manifest(m, on_error="skip", label_names=None)
    assert len(posts) == n
    assert [(r.line, r.reason) for r in rejects] == [
        (n + 1, "duplicate id 'id0'; first seen on line 1"),
        (n + 2, "duplicate id 'id12345'; first seen on line 12346"),
        (n + 3, f"duplicate id 'id{n - 1}'; first seen on line {n}")]
    seen = _SeenIds()
    for i in range(n):
        assert seen.first_line(f"x{i}") is None
        seen.add(f"x{i}", i + 1)
    assert len(seen.hi) >= 16384 and seen.first_line("x0") == 1 and seen.first_line("x19999") == n
    assert seen.first_line("y0") is None
