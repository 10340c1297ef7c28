// Why this file exists: the browser tests drive Debian's chromium through
// chromium-driver's W3C WebDriver HTTP API. The few commands they need (a session
// per user, navigate, find, click, type, run a script, screenshot) fit in this
// file, so the tests need no npm package.
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import os from "node:os";
import path from "node:path";

const ELEMENT = "element-6066-11e4-a52e-4f735466cecf";

async function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

export function chromiumBinary() {
  // Debian's /usr/bin/chromium is a wrapper script; the browser itself lives here.
  for (const candidate of [process.env.CHROMIUM_BIN, "/usr/lib/chromium/chromium", "/usr/bin/chromium"]) {
    if (candidate && existsSync(candidate)) return candidate;
  }
  throw new Error("chromium not found (deploy/local/install-browser.sh installs it)");
}

/** A chromedriver process of our own, on a free loopback port. */
export class Driver {
  static async start() {
    const port = await freePort();
    const bin = process.env.CHROMEDRIVER_BIN ?? "chromedriver";
    const child = spawn(bin, [`--port=${port}`, "--allowed-ips=127.0.0.1"], { stdio: ["ignore", "pipe", "pipe"] });
    let output = "";
    child.stdout.on("data", (d) => (output = (output + d).slice(-4000)));
    child.stderr.on("data", (d) => (output = (output + d).slice(-4000)));
    const driver = new Driver(`http://127.0.0.1:${port}`, child);
    const deadline = Date.now() + 20000;
    for (;;) {
      if (child.exitCode !== null) throw new Error(`chromedriver exited: ${output}`);
      try {
        const res = await fetch(`${driver.base}/status`);
        if ((await res.json()).value?.ready) return driver;
      } catch {
        /* not listening yet */
      }
      if (Date.now() > deadline) {
        driver.stop();
        throw new Error(`chromedriver did not become ready: ${output}`);
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  constructor(base, child) {
    this.base = base;
    this.child = child;
    this.sessions = [];
  }

  /** A browser of its own (fresh profile: its own sessionStorage, cookies, cache). */
  async session({ width = 1000, height = 720 } = {}) {
    const profile = mkdtempSync(path.join(os.tmpdir(), "chatfleet-chromium-"));
    const args = [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--disable-dev-shm-usage",
      // Timers of a page that is not in front must not be throttled: both users'
      // pages are live at once.
      "--disable-background-timer-throttling",
      "--disable-renderer-backgrounding",
      "--disable-backgrounding-occluded-windows",
      `--user-data-dir=${profile}`,
      `--window-size=${width},${height}`,
    ];
    const res = await fetch(`${this.base}/session`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        capabilities: {
          alwaysMatch: {
            browserName: "chrome",
            pageLoadStrategy: "normal",
            "goog:chromeOptions": { binary: chromiumBinary(), args },
          },
        },
      }),
    });
    const body = await res.json();
    if (!res.ok) throw new Error(`new session: ${JSON.stringify(body.value)}`);
    const session = new Session(this.base, body.value.sessionId, profile);
    this.sessions.push(session);
    return session;
  }

  async stop() {
    for (const s of this.sessions) await s.quit().catch(() => {});
    this.sessions = [];
    if (this.child.exitCode === null) this.child.kill("SIGTERM");
  }
}

export class Session {
  constructor(base, id, profile) {
    this.url = `${base}/session/${id}`;
    this.profile = profile;
  }

  async cmd(method, suffix, body) {
    const res = await fetch(this.url + suffix, {
      method,
      headers: body ? { "Content-Type": "application/json" } : {},
      body: body ? JSON.stringify(body) : undefined,
    });
    const data = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error(`${method} ${suffix}: ${data.value?.error}: ${data.value?.message?.split("\n")[0]}`);
    return data.value;
  }

  navigate(url) {
    return this.cmd("POST", "/url", { url });
  }

  /** Run `fn` (a function's source) in the page with `args`; returns its JSON result. */
  exec(fn, ...args) {
    return this.cmd("POST", "/execute/sync", { script: `return (${fn}).apply(null, arguments);`, args });
  }

  async find(css) {
    const found = await this.cmd("POST", "/element", { using: "css selector", value: css });
    return found[ELEMENT];
  }

  /** `action(elementId)` on a fresh look-up of `css`, again when the page redrew it in between. */
  async withElement(css, action) {
    for (let attempt = 1; ; attempt++) {
      try {
        return await action(await this.find(css));
      } catch (err) {
        if (attempt >= 5 || !/stale element/.test(err.message)) throw err;
      }
    }
  }

  click(css) {
    return this.withElement(css, (id) => this.cmd("POST", `/element/${id}/click`, {}));
  }

  type(css, text) {
    return this.withElement(css, (id) => this.cmd("POST", `/element/${id}/value`, { text }));
  }

  clear(css) {
    return this.withElement(css, (id) => this.cmd("POST", `/element/${id}/clear`, {}));
  }

  text(css) {
    return this.exec((sel) => document.querySelector(sel)?.textContent ?? null, css);
  }

  setSize(width, height) {
    return this.cmd("POST", "/window/rect", { width, height });
  }

  /** Poll `fn` in the page until it returns something truthy. */
  async waitFor(fn, args = [], { timeoutMs = 15000, what = "condition" } = {}) {
    const deadline = Date.now() + timeoutMs;
    let last;
    for (;;) {
      try {
        last = await this.exec(fn, ...args);
        if (last) return last;
      } catch (err) {
        last = err.message;
      }
      if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${JSON.stringify(last)})`);
      await new Promise((r) => setTimeout(r, 150));
    }
  }

  async screenshot(file) {
    const png = await this.cmd("GET", "/screenshot");
    writeFileSync(file, Buffer.from(png, "base64"));
    return file;
  }

  async quit() {
    try {
      await this.cmd("DELETE", "");
    } finally {
      rmSync(this.profile, { recursive: true, force: true });
    }
  }
}
