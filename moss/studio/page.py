"""The studio's one page: a script, a prompt clip and transcript per speaker, Generate, then a player per model.

Plain HTML and a little JavaScript, no framework and nothing fetched from elsewhere (the page works offline).
Results are put in with `textContent` and element properties, never as HTML, so nothing a script or a server
message holds can run in the page.
"""

from __future__ import annotations

import json

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MOSS-TTSD studio</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222;padding:0 1em}
textarea{width:100%;font:inherit}fieldset{margin:.6em 0;border:1px solid #ccc}
.voices{display:flex;gap:1em;flex-wrap:wrap}.voice{flex:1;min-width:18em;border:1px solid #ddd;padding:.8em}
#error{color:#b00020;font-weight:600;white-space:pre-wrap}.small{color:#666;font-size:.9em}
button{font-size:1.05em;padding:.4em 1.2em}
</style></head><body>
<h1>MOSS-TTSD studio</h1>
<p class="small"><span id="models">Models</span>: <span id="labels"></span>.<span id="same-seed"> Same seed for
each, so the difference is the weights.</span></p>
<form id="form">
<label for="text">Dialogue script (<code>[S1]</code> and <code>[S2]</code> mark the speakers)</label>
<textarea id="text" name="text" rows="6">
[S1]Hello, welcome back to the show.[S2]Thanks, it is good to be here.</textarea>
<fieldset><legend>Voices to clone (optional: both speakers, or neither)</legend>
<div>Speaker 1: <input type="file" id="audio1" accept="audio/*"> transcript
<input type="text" id="prompt1" size="40"></div>
<div>Speaker 2: <input type="file" id="audio2" accept="audio/*"> transcript
<input type="text" id="prompt2" size="40"></div>
</fieldset>
<button type="submit" id="generate">Generate</button> <span id="status" class="small"></span>
</form>
<div id="error" role="alert"></div>
<div class="voices" id="results"></div>
<script>
const LABELS = __LABELS__;
document.getElementById("labels").textContent = LABELS.join(" vs ");
if (LABELS.length === 1) {  // nothing to compare: no word of a comparison
  document.getElementById("models").textContent = "Model";
  document.getElementById("same-seed").remove();
}
function readFile(input) {
  const file = input.files[0];
  if (!file) return Promise.resolve(null);
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve({name: file.name, audio: reader.result.split(",", 2)[1] || ""});
    reader.onerror = () => reject(new Error("cannot read " + file.name));
    reader.readAsDataURL(file);
  });
}
function show(result) {
  const box = document.createElement("div");
  box.className = "voice";
  box.dataset.label = result.label;
  const title = document.createElement("h2");
  title.textContent = result.label;
  box.appendChild(title);
  if (result.error) {
    const error = document.createElement("p");
    error.className = "item-error";
    error.textContent = result.error;
    box.appendChild(error);
  } else {
    const audio = document.createElement("audio");
    audio.controls = true;
    audio.src = result.audio;
    box.appendChild(audio);
    const link = document.createElement("a");
    link.href = result.audio;
    link.download = result.label + ".wav";
    link.textContent = "download (" + result.duration_s.toFixed(2) + " s)";
    box.appendChild(document.createElement("br"));
    box.appendChild(link);
  }
  const facts = document.createElement("p");
  facts.className = "small metrics";
  facts.textContent = Object.entries(result.metrics || {}).map(([k, v]) => k + " " + v.toFixed(3)).join(", ");
  box.appendChild(facts);
  document.getElementById("results").appendChild(box);
}
document.getElementById("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const error = document.getElementById("error"), status = document.getElementById("status");
  const button = document.getElementById("generate");
  error.textContent = "";
  document.getElementById("results").replaceChildren();
  button.disabled = true;
  status.textContent = "generating...";
  try {
    const byId = (id) => document.getElementById(id);
    const clips = await Promise.all([readFile(byId("audio1")), readFile(byId("audio2"))]);
    const texts = [byId("prompt1").value, byId("prompt2").value];
    const speakers = clips.some((c) => c) ? clips.map((c, i) => ({...(c || {}), text: texts[i]})) : [];
    const response = await fetch("api/generate", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({text: document.getElementById("text").value, speakers})});
    const answer = await response.json();
    if (answer.error) throw new Error(answer.error);
    answer.results.forEach(show);
    status.textContent = "done";
  } catch (err) {
    error.textContent = err.message;
    status.textContent = "";
  } finally {
    button.disabled = false;
  }
});
</script></body></html>
"""


def render_page(labels: list[str]) -> str:
    """The page, told which models answer (their labels, shown and used as column titles)."""
    return PAGE.replace("__LABELS__", json.dumps(labels).replace("<", "\\u003c"))  # no "</script>" in a label
