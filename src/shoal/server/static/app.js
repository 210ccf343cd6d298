// shoal's dashboard: pages over the daemon's own API (/api/v1/...), a live terminal over /terminal/{id}.
// Everything shown comes from sandboxes or their users, so it is put in the page as text (never as HTML).

const main = document.getElementById("main");
let leave = () => {};  // stops the current page's polling and streams

// ------------------------------------------------------------------ helpers

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

async function api(path, options = {}) {
  const resp = await fetch("/api" + path, { credentials: "same-origin", ...options });
  if (resp.status === 401) { location.reload(); throw new Error("signed out"); }
  const text = await resp.text();
  const body = text ? JSON.parse(text) : {};
  if (!resp.ok) throw new Error(body.error ? `${body.error.type}: ${body.error.message}` : resp.statusText);
  return body;
}

async function apiLines(path) {
  const resp = await fetch("/api" + path, { credentials: "same-origin" });
  if (!resp.ok) throw new Error(resp.statusText);
  return (await resp.text()).split("\n").filter(Boolean).map((line) => JSON.parse(line));
}

function toast(message) {
  const el = document.getElementById("toast");
  el.textContent = message;
  el.classList.add("show");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => el.classList.remove("show"), 4000);
}

function size(bytes) {
  if (bytes === null || bytes === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; i++; }
  return `${bytes.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function age(us) {
  const s = Math.max(0, Date.now() / 1000 - us / 1e6);
  if (s < 60) return `${Math.floor(s)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d`;
}

function when(us) { return us ? new Date(us / 1000).toLocaleString() : ""; }

function badge(state, returncode) {
  const failed = state === "finished" && returncode !== null && returncode !== 0;
  return h("span", { class: `badge ${failed ? "failed" : state}` }, state);
}

function tags(map) { return Object.entries(map || {}).map(([k, v]) => h("span", { class: "tag" }, `${k}=${v}`)); }

function table(headers, rows, empty) {
  if (!rows.length) return h("p", { class: "muted" }, empty);
  const head = h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x))));
  return h("div", { class: "scroll" }, h("table", {}, head, h("tbody", {}, rows)));
}

function every(ms, fn) {
  let stopped = false;
  let timer = null;
  const tick = async () => {
    try { await fn(); } catch (e) { if (!stopped) toast(e.message); }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}

function page(title, ...rest) { main.replaceChildren(h("h1", {}, title), ...rest); }

// ------------------------------------------------------------------ sandboxes

function sandboxesPage(params) {
  const app = params.get("app");
  const all = params.get("all") !== "0";
  const body = h("div", {});
  page(app ? `Sandboxes of ${app}` : "Sandboxes", body);
  return every(1000, async () => {
    const query = new URLSearchParams();
    if (app) query.set("app_id", app);
    if (all) query.set("include_finished", "1");
    const [list, usage, apps] = await Promise.all([
      api(`/v1/sandboxes?${query}`), api("/v1/usage"), api("/v1/apps")]);
    const appNames = Object.fromEntries(apps.apps.map((a) => [a.app_id, a.name]));
    const rows = list.sandboxes.map((sb) => {
      const u = usage.usage[sb.sandbox_id];
      return h("tr", { "data-sandbox-id": sb.sandbox_id },
        h("td", { class: "mono" }, h("a", { href: `#/sandboxes/${sb.sandbox_id}` }, sb.sandbox_id)),
        h("td", {}, h("a", { href: `#/sandboxes?app=${sb.app_id}`, title: sb.app_id },
          appNames[sb.app_id] || sb.app_id)),
        h("td", {}, sb.name || ""),
        h("td", { class: "state" }, badge(sb.state, sb.returncode)),
        h("td", {}, sb.runtime),
        h("td", {}, age(sb.created_at_us)),
        h("td", {}, u ? [h("span", { class: "bar", style: `width:${Math.min(40, u.cpu_cores * 40)}px` }),
          u.cpu_cores.toFixed(2)] : ""),
        h("td", {}, u ? size(u.memory_bytes) : ""),
        h("td", {}, sb.returncode ?? ""),
        h("td", { class: "tags" }, tags(sb.tags)));
    });
    body.replaceChildren(table(
      ["Sandbox", "App", "Name", "State", "Runtime", "Age", "CPU", "Memory", "Exit", "Tags"],
      rows, "No sandboxes yet: create one with the SDK, the CLI or the official modal client."));
  });
}

function streamInto(pre, url, cls) {
  const controller = new AbortController();
  (async () => {
    const resp = await fetch(url, { credentials: "same-origin", signal: controller.signal });
    if (!resp.ok) return;
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.append(h("span", { class: cls }, decoder.decode(value, { stream: true })));
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    }
  })().catch(() => {});
  return () => controller.abort();
}

function openTerminal(id, box, button) {
  let closeTerm = () => {};
  button.disabled = true;
  (async () => {
    let xterm, fit;
    try {
      [xterm, fit] = await Promise.all([import("./vendor/xterm.mjs"), import("./vendor/addon-fit.mjs")]);
    } catch {
      toast("xterm.js is missing from this install: run `make setup` (scripts/vendor-xterm)");
      button.disabled = false;
      return;
    }
    const term = new xterm.Terminal({ cursorBlink: true, fontSize: 13, theme: { background: "#0f1722" } });
    const fitter = new fit.FitAddon();
    term.loadAddon(fitter);
    box.replaceChildren();
    box.hidden = false;
    term.open(box);
    fitter.fit();
    const ws = new WebSocket(`ws://${location.host}/terminal/${id}?rows=${term.rows}&cols=${term.cols}`);
    ws.binaryType = "arraybuffer";
    ws.onmessage = (ev) => {
      if (typeof ev.data === "string") {
        const msg = JSON.parse(ev.data);
        if (msg.type === "exit") term.write(`\r\n[the shell exited with ${msg.code}]\r\n`);
      } else {
        term.write(new Uint8Array(ev.data));
      }
    };
    ws.onclose = () => { button.disabled = false; };
    term.onData((data) => { if (ws.readyState === 1) ws.send(JSON.stringify({ type: "input", data })); });
    term.onResize(({ rows, cols }) => {
      if (ws.readyState === 1) ws.send(JSON.stringify({ type: "resize", rows, cols }));
    });
    const onWindow = () => fitter.fit();
    window.addEventListener("resize", onWindow);
    term.focus();
    closeTerm = () => { window.removeEventListener("resize", onWindow); ws.close(); term.dispose(); };
  })();
  return () => closeTerm();
}

function sandboxPage(id) {
  const facts = h("div", { class: "grid" });
  const stdout = h("pre", { class: "logs", id: "logs" });
  const execs = h("div", {});
  const termBox = h("div", { class: "term", id: "terminal", hidden: true });
  const termButton = h("button", { class: "primary", id: "open-terminal" }, "Open a terminal");
  const stopButton = h("button", { class: "danger", id: "terminate" }, "Terminate");
  const state = h("span", { id: "state" });
  const closers = [];
  termButton.addEventListener("click", () => closers.push(openTerminal(id, termBox, termButton)));
  stopButton.addEventListener("click", async () => {
    if (!confirm(`Terminate ${id}? Its processes are killed (return code 137).`)) return;
    stopButton.disabled = true;
    try { await api(`/v1/sandboxes/${id}/terminate`, { method: "POST" }); toast(`${id} terminated`); }
    catch (e) { toast(e.message); stopButton.disabled = false; }
  });
  main.replaceChildren(
    h("h1", {}, h("span", { class: "mono" }, id), state, h("span", { style: "flex:1" }), stopButton),
    facts,
    h("h2", {}, "Entrypoint output"), stdout,
    h("h2", {}, "Processes"), execs,
    h("h2", {}, "Terminal"), h("div", { class: "toolbar" }, termButton,
      h("span", { class: "muted" }, "a shell in the sandbox (bash, else sh)")), termBox);
  const base = `/api/v1/sandboxes/${id}/execs/entrypoint/output`;
  closers.push(streamInto(stdout, `${base}/1`, "out"), streamInto(stdout, `${base}/2`, "err"));
  closers.push(every(1000, async () => {
    const [sb, list, usage] = await Promise.all([
      api(`/v1/sandboxes/${id}`), api(`/v1/sandboxes/${id}/execs`), api("/v1/usage")]);
    const u = usage.usage[id];
    state.replaceChildren(badge(sb.state, sb.returncode));
    stopButton.hidden = sb.state === "finished";
    termButton.hidden = sb.state !== "running";
    const card = (k, v) => h("div", { class: "card" }, h("div", { class: "k" }, k), h("div", { class: "v" }, v));
    facts.replaceChildren(
      card("App", h("a", { href: `#/sandboxes?app=${sb.app_id}` }, sb.app_id)),
      card("Name", sb.name || "—"), card("Runtime", sb.runtime), card("Image", sb.image_id),
      card("Created", when(sb.created_at_us)), card("Timeout", `${sb.timeout} s`),
      card("Return code", sb.returncode ?? "—"), card("CPU", u ? `${u.cpu_cores.toFixed(2)} cores` : "—"),
      card("Memory", u ? size(u.memory_bytes) : "—"), card("Tags", Object.keys(sb.tags).length ? tags(sb.tags) : "—"));
    const rows = list.execs.map((p) => h("tr", {},
      h("td", { class: "mono" }, p.exec_id),
      h("td", { class: "mono wrap" }, p.args.join(" ")),
      h("td", {}, p.state),
      h("td", {}, p.returncode ?? ""),
      h("td", {}, p.pid ?? "")));
    execs.replaceChildren(table(["Process", "Command", "State", "Return code", "Pid"], rows, "No processes."));
  }));
  return () => closers.forEach((close) => close());
}

// ------------------------------------------------------------------ the rest

function appsPage() {
  const body = h("div", {});
  page("Apps", body);
  return every(2000, async () => {
    const { apps } = await api("/v1/apps");
    const rows = apps.map((a) => h("tr", {},
      h("td", { class: "mono" }, h("a", { href: `#/sandboxes?app=${a.app_id}` }, a.app_id)),
      h("td", {}, a.name || ""),
      h("td", {}, a.ephemeral ? "ephemeral" : "named"),
      h("td", {}, when(a.created_at_us)),
      h("td", {}, when(a.stopped_at_us)),
      h("td", {}, a.sandboxes_running),
      h("td", {}, tags(a.tags))));
    body.replaceChildren(table(["App", "Name", "Kind", "Created", "Stopped", "Running", "Tags"], rows, "No apps yet."));
  });
}

function describe(recipe) {
  if (!recipe) return "";
  if (recipe.kind === "step") return recipe.step || recipe.op;
  if (recipe.kind === "debian_slim") return `debian_slim (Python ${recipe.python}, ${recipe.suite})`;
  return recipe.kind + (recipe.reference ? ` ${recipe.reference}` : "");
}

function imagesPage() {
  const body = h("div", {});
  const summary = h("span", { class: "muted" });
  const prune = h("button", { id: "prune" }, "Prune unused build steps");
  prune.addEventListener("click", async () => {
    try {
      const got = await api("/v1/image-store/prune", { method: "POST" });
      toast(`removed ${got.removed_images} images and ${got.removed_layers} layers: ${size(got.freed_bytes)} freed`);
    } catch (e) { toast(e.message); }
  });
  page("Images", h("div", { class: "toolbar" }, prune, summary), body);
  return every(3000, async () => {
    const store = await api("/v1/image-store");
    const total = store.images.reduce((n, im) => n + (im.own_size || 0), 0);
    summary.textContent = `${store.images.length} images, ${size(total)} on disk`;
    const rows = store.images.map((im) => h("tr", {},
      h("td", { class: "mono" }, im.image_id),
      h("td", { class: "wrap" }, describe(im.recipe)),
      h("td", {}, im.layers.length),
      h("td", {}, size(im.size)),
      h("td", {}, size(im.own_size)),
      h("td", {}, im.in_use ? "yes" : ""),
      h("td", {}, when(im.created_at_us))));
    const headers = ["Image", "What", "Layers", "Size", "Own size", "In use", "Created"];
    body.replaceChildren(table(headers, rows, "No images yet."));
  });
}

function volumesPage() {
  const body = h("div", {});
  page("Volumes", body);
  return every(3000, async () => {
    const { volumes } = await api("/v1/volumes?usage=1");
    const rows = volumes.map((v) => h("tr", {},
      h("td", { class: "mono" }, h("a", { href: `#/volumes/${v.volume_id}` }, v.volume_id)),
      h("td", {}, h("a", { href: `#/volumes/${v.volume_id}` }, v.name || (v.ephemeral ? "(ephemeral)" : ""))),
      h("td", {}, size(v.size_bytes)),
      h("td", {}, when(v.created_at_us))));
    body.replaceChildren(table(["Volume", "Name", "Size", "Created"], rows, "No volumes yet."));
  });
}

function volumePage(id) {
  const body = h("div", {});
  page(h("span", {}, "Volume ", h("span", { class: "mono" }, id)), body);
  return every(3000, async () => {
    const entries = await apiLines(`/v1/volumes/${id}/entries?path=/&recursive=1`);
    const rows = entries.map((e) => h("tr", {},
      h("td", { class: "mono wrap" }, e.path),
      h("td", {}, e.type === 2 ? "directory" : "file"),
      h("td", {}, e.type === 2 ? "" : size(e.size)),
      h("td", {}, e.mtime ? new Date(e.mtime * 1000).toLocaleString() : "")));
    body.replaceChildren(table(["Path", "Type", "Size", "Modified"], rows, "This volume is empty."));
  });
}

function secretsPage() {
  const body = h("div", {});
  page("Secrets", h("p", { class: "muted" }, "Names only: values never leave the daemon."), body);
  return every(3000, async () => {
    const { secrets } = await api("/v1/secrets");
    const rows = secrets.map((s) => h("tr", {},
      h("td", {}, s.name),
      h("td", { class: "mono" }, s.secret_id),
      h("td", {}, when(s.created_at_us)),
      h("td", {}, when(s.updated_at_us))));
    body.replaceChildren(table(["Name", "Secret", "Created", "Updated"], rows, "No named secrets."));
  });
}

// ------------------------------------------------------------------ routing

function route() {
  leave();
  const [path, query] = (location.hash.slice(1) || "/sandboxes").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  for (const a of document.querySelectorAll("nav.side a")) a.classList.toggle("active", a.dataset.page === parts[0]);
  if (parts[0] === "sandboxes" && parts[1]) leave = sandboxPage(parts[1]);
  else if (parts[0] === "apps") leave = appsPage();
  else if (parts[0] === "images") leave = imagesPage();
  else if (parts[0] === "volumes" && parts[1]) leave = volumePage(parts[1]);
  else if (parts[0] === "volumes") leave = volumesPage();
  else if (parts[0] === "secrets") leave = secretsPage();
  else leave = sandboxesPage(params);
}

window.addEventListener("hashchange", route);
route();
api("/v1/status").then((s) => {
  document.getElementById("daemon").textContent = `shoal ${s.version} · ${s.sandboxes_running} running`;
}).catch(() => {});
