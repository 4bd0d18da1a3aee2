// The sgmft page: text + images -> POST /v1/predict (multipart) -> 8 probability bars.
// No framework and nothing from the network but this server.
"use strict";
const $ = (id) => document.getElementById(id);
const files = [];            // File objects, in the order they are sent
let labels = [];
let shown = null;            // the result on screen and the files it was computed from: {r, sent}

const ZH = { home: "家", work: "工作", school: "学校", restaurant: "餐厅", cinema: "电影院", travel: "旅行",
             shopping: "购物", sports: "运动", gym: "健身房", hospital: "医院", park: "公园", office: "办公室" };
const show = (name) => (ZH[name] ? `${ZH[name]} ${name}` : name);
const IMAGE_CODES = ["not_an_image", "empty_image", "truncated_image", "corrupt_image", "image_size_too_large",
                     "image_pixels_too_large"];

function setError(msg) {
  const box = $("error");
  box.textContent = msg || "";
  box.hidden = !msg;
}

function describeError(status, body) {
  // The service answers {"error": {"code", "message", ...}}; its message is written for a person.
  const e = body && body.error;
  if (!e) return `服务器返回 ${status}。 / The server answered ${status}.`;
  const zh = {
    text_too_long: "文本太长", too_many_images: "图片太多", image_size_too_large: "图片文件太大",
    image_pixels_too_large: "图片像素太多", request_pixels_too_large: "图片总像素太多", body_size_too_large: "上传内容太大",
    not_an_image: "不是图片", truncated_image: "图片不完整", corrupt_image: "图片已损坏", empty_image: "图片为空",
    queue_full: "服务器繁忙，请稍后再试", shutting_down: "服务器正在关闭，请稍后再试",
  }[e.code];
  let msg = (zh ? zh + " / " : "") + e.message;
  if (IMAGE_CODES.includes(e.code) && !$("skip-bad").checked)
    msg += "\n移除该图片，或勾选“跳过无法读取的图片”。 / Remove it, or tick “skip unreadable images” to predict without it.";
  return msg;
}

function setBusy(busy) {
  // While a prediction runs: the form says so, both buttons wait, the previous result stays, dimmed.
  $("post-form").setAttribute("aria-busy", busy ? "true" : "false");
  $("predict").disabled = busy;
  $("clear").disabled = busy;
  $("predict-label").textContent = busy ? "预测中… / Predicting…" : "预测 / Predict";
  $("status").textContent = busy ? "正在预测… / Predicting…" : "";
  $("results").classList.toggle("stale", busy || (shown && shown.outdated));
}

function renderThumbs(result) {
  const ul = $("thumbs");
  ul.innerHTML = "";
  const chosen = result ? [].concat(result.image_index ?? []) : [];
  files.forEach((f, i) => {
    const li = document.createElement("li");
    li.dataset.index = i;
    if (result && chosen.includes(i)) li.classList.add("chosen");
    else if (result) li.classList.add("unused");
    const img = document.createElement("img");
    img.src = URL.createObjectURL(f);
    img.alt = f.name;
    img.onload = () => URL.revokeObjectURL(img.src);
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = "✓ 模型所用 used";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = `${i + 1}. ${f.name}`;
    const rm = document.createElement("button");
    rm.type = "button";
    rm.className = "remove";
    rm.title = `移除 remove ${f.name}`;
    rm.setAttribute("aria-label", `移除图片 ${i + 1} / remove image ${i + 1}: ${f.name}`);
    rm.textContent = "×";
    rm.onclick = (ev) => { ev.stopPropagation(); files.splice(i, 1); imagesChanged(); };
    li.append(badge, img, name, rm);
    ul.append(li);
  });
}

function imagesChanged() {
  // The result on screen was computed from other images: keep it, dimmed, and say so.
  renderThumbs(null);
  if (shown) {
    shown.outdated = true;
    $("image-used").textContent = imageUsedText(shown);
    $("results").classList.add("stale");
    $("status").textContent = "图片已更改，请重新预测。 / The images changed: press Predict again.";
  }
}

function imageUsedText(s) {
  const idx = [].concat(s.r.image_index ?? []);
  if (!idx.length) return "（无 / none）";
  return idx.map((i) => {
    const f = s.sent[i];
    const gone = f && !files.includes(f) ? " （已移除 / removed）" : "";
    return `${f ? f.name : s.r.image_name}${gone}`;
  }).join(", ");
}

function addFiles(list) {
  for (const f of list) files.push(f);
  imagesChanged();
}

function renderResult(r, sent) {
  shown = { r, sent, outdated: false };
  const bars = $("bars");
  bars.innerHTML = "";
  const order = Object.entries(r.probs).sort((a, b) => b[1] - a[1]);
  for (const [name, p] of order) {
    const row = document.createElement("div");
    row.className = "bar-row" + (name === r.label ? " top" : "");
    row.dataset.label = name;
    row.dataset.prob = p;
    const n = document.createElement("span");
    n.className = "bar-name";
    n.textContent = show(name);
    const track = document.createElement("div");
    track.className = "bar-track";
    const fill = document.createElement("div");
    fill.className = "bar-fill";
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    track.append(fill);
    const v = document.createElement("span");
    v.className = "bar-val";
    v.textContent = `${(100 * p).toFixed(1)} %`;
    row.append(n, track, v);
    bars.append(row);
  }
  $("top-label").textContent = show(r.label);
  $("top-label").dataset.label = r.label;
  $("top-prob").textContent = `(p = ${r.prob.toFixed(3)})`;
  $("uncertain").hidden = !r.uncertain;
  const sentence = r.explanation && r.explanation.sentence;
  $("explanation").textContent = sentence || "";
  $("explanation").hidden = !sentence;
  $("text-used").textContent = r.text_used || "（无 / none）";
  $("image-used").textContent = imageUsedText(shown);
  const ul = $("warnings");
  ul.innerHTML = "";
  for (const w of r.warnings) {
    const li = document.createElement("li");
    li.textContent = w;
    ul.append(li);
  }
  renderThumbs(r);
  $("results").classList.remove("stale");
  $("results").hidden = false;
}

async function predict(ev) {
  ev.preventDefault();
  setError("");
  const text = $("text").value;
  if (!text.trim() && !files.length) {
    setError("请输入文本或添加图片。 / Type a text or add an image.");
    return;
  }
  const fd = new FormData();
  fd.append("text", text);
  for (const f of files) fd.append("images", f, f.name);
  fd.append("on_bad_image", $("skip-bad").checked ? "skip" : "error");
  const sent = files.slice();
  setBusy(true);
  try {
    const res = await fetch("/v1/predict", { method: "POST", body: fd });
    let body = null;
    try { body = await res.json(); } catch (_) { /* not JSON */ }
    if (!res.ok) { setError(describeError(res.status, body)); return; }
    renderResult(body, sent);
  } catch (e) {
    setError(`无法连接服务器 / Cannot reach the server (${e.message}).`);
  } finally {
    setBusy(false);
  }
}

async function loadModel() {
  try {
    const res = await fetch("/v1/model");
    const m = await res.json();
    labels = m.labels || [];
    const acc = m.evaluation && m.evaluation.test ? `, test accuracy ${(100 * m.evaluation.test.accuracy).toFixed(1)} %` : "";
    $("model-info").textContent = `${labels.length} places: ${labels.map(show).join(" · ")} — preset ${m.preset}, ` +
                                  `backbone ${m.backbone.split(":")[0]}, D=${m.dim}${acc}`;
  } catch (e) {
    $("model-info").textContent = "model info unavailable / 无法获取模型信息";
  }
}

const drop = $("drop");
drop.addEventListener("click", () => $("files").click());
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("files").click(); });
$("files").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
for (const t of ["dragenter", "dragover"]) drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const t of ["dragleave", "drop"]) drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); });
drop.addEventListener("drop", (e) => addFiles([...e.dataTransfer.files].filter((f) => f.type.startsWith("image/") || !f.type)));
$("post-form").addEventListener("submit", predict);
$("clear").addEventListener("click", () => { files.length = 0; $("text").value = ""; renderThumbs(null); shown = null;
                                             $("results").hidden = true; $("status").textContent = ""; setError(""); });
loadModel();
