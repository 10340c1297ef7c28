// Why this file exists: the SDK's network tests and the browser tests run against
// the real local stack that tests/web/run.sh started (deploy/local/up.sh with its
// own STACK_DIR and ports). This is how they find it: the edge's URL, development
// tokens signed with that stack's secret (what deploy/local/token.sh does), and the
// stack's scripts, so no test writes a second copy of them.
import { createHmac } from "node:crypto";
import { readFileSync } from "node:fs";
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import path from "node:path";

const run = promisify(execFile);

/** The edge's origin, or null when no stack runs (the network tests are then skipped). */
export const EDGE = process.env.CHATFLEET_EDGE_URL ?? null;
export const ROOT = process.env.CHATFLEET_ROOT ?? path.resolve(import.meta.dirname ?? new URL(".", import.meta.url).pathname, "../../..");

function secret() {
  const file = process.env.CHATFLEET_DEV_SECRETS;
  if (!file) throw new Error("CHATFLEET_DEV_SECRETS is not set (run through tests/web/run.sh)");
  const line = readFileSync(file, "utf8").split("\n").find((l) => l.startsWith("JWT_SECRET="));
  if (!line) throw new Error(`no JWT_SECRET in ${file}`);
  return line.slice("JWT_SECRET=".length).trim();
}

const b64url = (buf) => Buffer.from(buf).toString("base64url");

/** An HS256 development token for `user`, valid `ttlSeconds`. */
export function token(user, ttlSeconds = 3600) {
  const now = Math.floor(Date.now() / 1000);
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const payload = b64url(JSON.stringify({ sub: user, iat: now, exp: now + ttlSeconds }));
  const sig = createHmac("sha256", secret()).update(`${header}.${payload}`).digest("base64url");
  return `${header}.${payload}.${sig}`;
}

/** A user id no earlier test run used (the stack's data lives as long as the stack). */
export function uniqueUser(name) {
  return `${name}-${Date.now().toString(36)}${Math.floor(Math.random() * 1e6).toString(36)}`;
}

/** Run one of deploy/local's scripts against the test's stack. */
export async function script(name, ...args) {
  // Never a build here: the binaries are the ones the stack was started from.
  const env = { ...process.env, CHATFLEET_SKIP_BUILD: "1" };
  const { stdout } = await run(path.join(ROOT, "deploy/local", name), args, { env, timeout: 120000 });
  return stdout;
}

/** Poll `check` until it returns a truthy value or `timeoutMs` passes. */
export async function eventually(check, { timeoutMs = 15000, everyMs = 100, what = "condition" } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) return last;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${last?.stack ?? JSON.stringify(last)})`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}
