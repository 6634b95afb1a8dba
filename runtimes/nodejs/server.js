'use strict';
// Headwater Node.js runtime: a dependency-free HTTP server that runs functions in warm child processes.
//
// This program runs inside runtime pods and as local runtime processes. It uses only Node's own
// modules and never anything from Headwater's Python packages. It speaks the protocol described in
// runtimes/README.md, exactly as runtimes/python3/server.py does.
//
// How an execution runs: per (package, entry, limits) the server keeps warm child processes (this
// same file started with --child) that have loaded the function's module. A request goes to an idle
// child as one JSON line on a socket (fd 3); the child answers with log and result lines on it. The
// child is started through /bin/sh so `ulimit` can set its rlimits before Node starts (Node cannot
// set rlimits itself); when the server runs as root each child also gets a uid of its own, which
// makes the process limit exact and lets one kill(-1) as that uid end everything it started.

const http = require('http');
const https = require('https');
const fs = require('fs');
const path = require('path');
const zlib = require('zlib');
const crypto = require('crypto');
const cp = require('child_process');
const net = require('net');
const os = require('os');

const LOG_CAP = 1024 * 1024; // bytes of logs kept per execution
const MAX_BODY = 64 * 1024 * 1024; // largest /execute request accepted
const DEFAULT_NOFILE = 1024;
const DEFAULT_NPROC = 128; // processes a function may start; Qinling's value
const DEFAULT_FSIZE = 524288000; // largest file a function may write; Qinling's value
const NODE_THREADS = 12; // tasks Node itself runs (main, V8 platform, libuv pool): they count against RLIMIT_NPROC
const IDLE_CHILDREN = 4; // warm children kept per key beyond those running
// Children running at once per key; further requests wait in arrival order (the wait does not count
// against their timeout). Unbounded, a burst forks a child per request and throughput collapses.
const MAX_CHILDREN = Number(process.env.HEADWATER_RUNTIME_MAX_CHILDREN) || Math.max(4, 2 * require('os').cpus().length);
const DOWNLOAD_TIMEOUT = 30000;
const TIMEOUT_OUTPUT = 'Function execution timeout.';
const CANCELLED_OUTPUT = 'Function execution cancelled.';
const SANDBOX_UID_BASE = 2 ** 30; // same scheme as the python3 runtime: base + (server pid, slot)
const SANDBOX_UID_SLOTS = 256;
const SAFE_ENV = ['PATH', 'LANG', 'LC_ALL', 'LC_CTYPE', 'TZ'];
const MEMORY_TEXT = /heap out of memory|Reached heap limit|Allocation failed|out of memory/i;

function log(level, message) {
  process.stderr.write(`${new Date().toISOString()} ${level} headwater.runtime.nodejs ${message}\n`);
}

// ------------------------------------------------------------------------------------------------
// Packages: unpacked once per (function, version, md5) into the work dir

class PackageError extends Error {}

function packageKey(pkg) {
  const fid = String(pkg.function_id || 'anonymous');
  const version = String(pkg.version || 0);
  let md5 = String(pkg.md5sum || '');
  if (!md5 && pkg.path) {
    try {
      const st = fs.statSync(pkg.path);
      md5 = `${st.size}-${st.mtimeMs}`;
    } catch (err) {
      md5 = 'nomd5';
    }
  }
  return `${fid}_${version}_${md5}`.replace(/[^A-Za-z0-9._-]/g, '_').slice(0, 200);
}

// Where packages may come from: only what the engine named at start-up (--package-dir,
// --package-url). Any other path (/etc/shadow) or URL (file://, another host) is refused.
const PACKAGE_SOURCES = { dirs: [], urls: [] };
// What one package may unpack to, checked from the ZIP directory before anything is written.
const MAX_UNPACKED_BYTES = Number(process.env.HEADWATER_RUNTIME_MAX_UNPACKED_BYTES) || 512 * 1024 * 1024;
const MAX_FILES = Number(process.env.HEADWATER_RUNTIME_MAX_FILES) || 10000;

function allowedSource(pkg) {
  if (pkg.path !== undefined && pkg.path !== null) {
    if (typeof pkg.path !== 'string' || !PACKAGE_SOURCES.dirs.length) {
      throw new PackageError('Package path refused: this runtime takes no package paths.');
    }
    let real;
    try {
      real = fs.realpathSync(pkg.path);
    } catch (err) {
      real = path.resolve(pkg.path);
    }
    if (!PACKAGE_SOURCES.dirs.some((root) => real.startsWith(root + path.sep))) {
      throw new PackageError('Package path refused: not in a package directory this runtime was given.');
    }
    return { path: real };
  }
  if (pkg.download_url !== undefined && pkg.download_url !== null) {
    const url = pkg.download_url;
    if (typeof url !== 'string' || !PACKAGE_SOURCES.urls.some((prefix) => url.startsWith(prefix))) {
      throw new PackageError('Package URL refused: not under a package URL this runtime was given.');
    }
    return { url };
  }
  return {};
}

function fetchPackage(pkg, source) {
  if (source.path) {
    return fs.promises.readFile(source.path).catch((err) => {
      throw new PackageError(`Failed to read the function package: ${err.code || err.message}`);
    });
  }
  if (source.url) {
    return new Promise((resolve, reject) => {
      const url = source.url;
      const fail = (err) => reject(new PackageError(`Failed to download the function package: ${err.code || err.message || err}`));
      const headers = pkg.token ? { 'X-Auth-Token': pkg.token } : {};
      let req;
      try {
        req = (url.startsWith('https:') ? https : http).get(url, { headers, timeout: DOWNLOAD_TIMEOUT }, (res) => {
          if (res.statusCode !== 200) {
            res.resume();
            fail(new Error(`HTTP ${res.statusCode}`));
            return;
          }
          const chunks = [];
          res.on('data', (c) => chunks.push(c));
          res.on('end', () => resolve(Buffer.concat(chunks)));
          res.on('error', fail);
        });
      } catch (err) {
        fail(err);
        return;
      }
      req.on('timeout', () => req.destroy(new Error('timed out')));
      req.on('error', fail);
    });
  }
  return Promise.reject(new PackageError('Request names no package (package.path or package.download_url).'));
}

// A ZIP reader (store and deflate, no zip64): Node ships zlib but no archive format.
function unzip(data, target) {
  let eocd = -1;
  for (let i = data.length - 22; i >= Math.max(0, data.length - 65557); i--) {
    if (data.readUInt32LE(i) === 0x06054b50) {
      eocd = i;
      break;
    }
  }
  if (eocd < 0) throw new PackageError('Package is not a valid ZIP package: no end of central directory.');
  const count = data.readUInt16LE(eocd + 10);
  let p = data.readUInt32LE(eocd + 16);
  checkSize(data, count, p);
  for (let n = 0; n < count; n++) {
    if (p + 46 > data.length || data.readUInt32LE(p) !== 0x02014b50) throw new PackageError('Package is not a valid ZIP package: bad central directory.');
    const method = data.readUInt16LE(p + 10);
    const csize = data.readUInt32LE(p + 20);
    const usize = data.readUInt32LE(p + 24);
    const nameLen = data.readUInt16LE(p + 28);
    const extraLen = data.readUInt16LE(p + 30);
    const commentLen = data.readUInt16LE(p + 32);
    const attrs = data.readUInt32LE(p + 38) >>> 16;
    const local = data.readUInt32LE(p + 42);
    const name = data.toString('utf8', p + 46, p + 46 + nameLen);
    p += 46 + nameLen + extraLen + commentLen;
    // Like Python's extractall: drop absolute and '..' parts so nothing lands outside the target.
    const parts = name.split(/[\\/]+/).filter((s) => s && s !== '.' && s !== '..');
    if (!parts.length) continue;
    const dest = path.join(target, ...parts);
    if (name.endsWith('/')) {
      fs.mkdirSync(dest, { recursive: true, mode: 0o755 });
      continue;
    }
    if (local + 30 > data.length || data.readUInt32LE(local) !== 0x04034b50) throw new PackageError(`Package is not a valid ZIP package: bad entry ${name}.`);
    const start = local + 30 + data.readUInt16LE(local + 26) + data.readUInt16LE(local + 28);
    const raw = data.subarray(start, start + csize);
    let body;
    if (method === 0) body = raw;
    else if (method === 8) {
      try {
        body = zlib.inflateRawSync(raw, { maxOutputLength: Math.max(usize, 1) });
      } catch (err) {
        throw new PackageError(`Package is not a valid ZIP package: entry ${name} inflates past its declared size.`);
      }
    }
    else throw new PackageError(`Package is not a valid ZIP package: entry ${name} uses compression method ${method}.`);
    fs.mkdirSync(path.dirname(dest), { recursive: true, mode: 0o755 });
    fs.writeFileSync(dest, body, { mode: attrs & 0o100 ? 0o755 : 0o644 });
  }
}

function checkSize(data, count, p) {
  // Refuse a package whose directory declares too many files or bytes; each entry below is
  // checked again against its declared size when it is inflated.
  if (count > MAX_FILES) throw new PackageError(`Package has ${count} files; the limit is ${MAX_FILES}.`);
  let total = 0;
  for (let n = 0; n < count && p + 46 <= data.length; n++) {
    total += data.readUInt32LE(p + 24);
    p += 46 + data.readUInt16LE(p + 28) + data.readUInt16LE(p + 30) + data.readUInt16LE(p + 32);
  }
  if (total > MAX_UNPACKED_BYTES) throw new PackageError(`Package unpacks to ${total} bytes; the limit is ${MAX_UNPACKED_BYTES}.`);
}

class Packages {
  constructor(workDir, sandboxed) {
    this.root = path.join(path.resolve(workDir), 'packages');
    fs.mkdirSync(this.root, { recursive: true });
    // Sandboxed children reach their own package through an open descriptor only.
    if (sandboxed) fs.chmodSync(this.root, 0o700);
    this.dirs = new Map();
  }

  async unpack(pkg) {
    const source = allowedSource(pkg); // before any cache: a request must not reach another function's tree by its key
    const key = packageKey(pkg);
    if (this.dirs.has(key)) return this.dirs.get(key);
    const target = path.join(this.root, key);
    if (!fs.existsSync(target)) {
      const data = await fetchPackage(pkg, source);
      if (pkg.md5sum && crypto.createHash('md5').update(data).digest('hex') !== String(pkg.md5sum).toLowerCase()) {
        throw new PackageError('Package md5 mismatch.');
      }
      // Unpack beside the target and rename: another server sharing the work dir never sees a half-written tree.
      const tmp = fs.mkdtempSync(path.join(this.root, '.unpack-'));
      try {
        fs.chmodSync(tmp, 0o755);
        unzip(data, tmp);
        try {
          fs.renameSync(tmp, target);
        } catch (err) {
          if (!fs.existsSync(target)) throw err;
        }
      } finally {
        fs.rmSync(tmp, { recursive: true, force: true });
      }
    }
    this.dirs.set(key, target);
    return target;
  }
}

// ------------------------------------------------------------------------------------------------
// The server side: warm children and one execution

// network: 'none' (as root, each child gets a network namespace of its own) or 'host';
// scratchSize: bytes of the private tmpfs on /tmp (also bound on /var/tmp) and on /dev/shm.
const SANDBOX = { uids: false, baselineData: 0, network: 'none', scratchSize: 64 * 1024 * 1024 };
let uidSlot = 0;
const UIDS_IN_USE = new Set(); // slots of live children, released when a child has exited
const CHILDREN = new Set();

function sandboxUid() {
  // Round-robin, but never a slot a live child still holds (a wrapped counter once could).
  if (!SANDBOX.uids) return 0;
  for (let i = 0; i < SANDBOX_UID_SLOTS; i++) {
    uidSlot = (uidSlot + 1) % SANDBOX_UID_SLOTS;
    if (!UIDS_IN_USE.has(uidSlot)) {
      UIDS_IN_USE.add(uidSlot);
      return SANDBOX_UID_BASE + (process.pid % 2 ** 22) * SANDBOX_UID_SLOTS + uidSlot;
    }
  }
  throw new Error(`all ${SANDBOX_UID_SLOTS} sandbox uids of this server are in use by live children`);
}

function releaseUid(uid) {
  if (uid) UIDS_IN_USE.delete((uid - SANDBOX_UID_BASE) % SANDBOX_UID_SLOTS);
}

function uidTasks(uid) {
  // Tasks (processes and threads) of a uid now: RLIMIT_NPROC counts them all.
  let count = 0;
  for (const name of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      if (fs.statSync(`/proc/${name}`).uid === uid) count += fs.readdirSync(`/proc/${name}/task`).length;
    } catch (err) {
      // the process ended while we looked
    }
  }
  return count;
}

function killUid(uid) {
  // A shell running as the uid calls kill(-1): the kernel signals every process of that uid (never
  // the caller) in one pass that a fork bomb cannot outrun.
  const killer = cp.spawn('/bin/sh', ['-c', 'kill -9 -1; kill -9 -1'], { uid, gid: uid, stdio: 'ignore' });
  killer.on('error', (err) => log('WARNING', `cannot kill the processes of uid ${uid}: ${err.message}`));
  return killer;
}

function describeDeath(code, signal) {
  if (signal) return `Function execution failed: the process was killed by ${signal} (too much resource consumption?).`;
  return `Function execution failed: the process exited with code ${code} without a result.`;
}

class Child {
  constructor(pkgDir, entry, limits) {
    this.uid = sandboxUid();
    const memory = Number(limits.memory_size || 0);
    const files = Number(limits.files || DEFAULT_NOFILE);
    const fileSize = Number(limits.file_size || DEFAULT_FSIZE);
    const processes = Number(limits.processes || DEFAULT_NPROC);
    let nproc = 'unlimited';
    if (this.uid) nproc = NODE_THREADS + processes;
    else if (process.geteuid() !== 0) nproc = uidTasks(process.getuid()) + NODE_THREADS + processes;
    // The memory limit is what the function may allocate on top of Node's own footprint, like the
    // python3 runtime: RLIMIT_DATA for everything, and V8's old-space cap so a JS heap overflow is
    // a clean "heap out of memory" rather than a failed mmap anywhere.
    const data = memory ? String(Math.ceil((SANDBOX.baselineData + memory) / 1024)) : 'unlimited';
    const nodeArgs = ['--preserve-symlinks', '--preserve-symlinks-main'];
    if (memory) nodeArgs.push(`--max-old-space-size=${Math.max(16, Math.ceil(memory / 1048576))}`);
    // dash spells the process limit -p, bash -u.
    const script = 'ulimit -d "$1" && ulimit -n "$2" && ulimit -f "$3" && { [ "$4" = unlimited ] || ulimit -p "$4" 2>/dev/null || ulimit -u "$4"; } '
      + '&& shift 4 && exec "$@"';
    const dirFd = fs.openSync(pkgDir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
    // This script, as fd 5: the child's private /tmp hides it when the runtime itself lives under /tmp.
    const selfFd = fs.openSync(__filename, fs.constants.O_RDONLY);
    const env = {};
    for (const k of SAFE_ENV) if (process.env[k] !== undefined) env[k] = process.env[k];
    env.PATH = env.PATH || '/usr/local/bin:/usr/bin:/bin';
    env.HOME = this.uid ? os.tmpdir() : (process.env.HOME || os.tmpdir());
    env.HW_PKG = this.uid ? '/proc/self/fd/4' : pkgDir;
    env.HW_PKG_REAL = pkgDir;
    env.HW_ENTRY = entry;
    env.HW_SANDBOXED = this.uid ? '1' : '';
    const options = {
      cwd: pkgDir, env, detached: true, // own session and process group: one kill ends the tree
      stdio: ['ignore', 'pipe', 'pipe', 'pipe', dirFd, selfFd],
    };
    let command = '/bin/sh';
    let argv = ['-c', script, 'sh', data, String(files), String(Math.ceil(fileSize / 512)), String(nproc)];
    if (process.geteuid() === 0) {
      // As root: new mount (and network) namespaces, private size-limited scratch, then the uid.
      // Any failure ends the child before user code runs (fail closed).
      const size = String(SANDBOX.scratchSize);
      const isolate = `mount -t tmpfs -o size=${size},mode=1777,nosuid,nodev tmpfs /tmp `
        + `&& mount -t tmpfs -o size=${size},mode=1777,nosuid,nodev tmpfs /dev/shm `
        + '&& { [ ! -d /var/tmp ] || mount --bind /tmp /var/tmp; } '
        + (SANDBOX.network === 'none' ? '&& { ip link set lo up 2>/dev/null || true; } ' : '');
      argv = ['--mount', '--propagation', 'private', ...(SANDBOX.network === 'none' ? ['--net'] : []), '/bin/sh', '-c',
        `${isolate} && ${script}`, ...argv.slice(2)];
      command = 'unshare';
      if (this.uid) argv.push('setpriv', `--reuid=${this.uid}`, `--regid=${this.uid}`, '--clear-groups');
    } else if (this.uid) {
      Object.assign(options, { uid: this.uid, gid: this.uid });
    }
    if (process.geteuid() === 0) env.HOME = env.TMPDIR = '/tmp';
    try {
      this.proc = cp.spawn(command, [...argv, process.execPath, ...nodeArgs, '/proc/self/fd/5', '--child'], options);
    } finally {
      fs.closeSync(dirFd);
      fs.closeSync(selfFd);
    }
    this.pid = this.proc.pid;
    this.alive = true;
    this.execution = null;
    this.pending = []; // output written while no execution runs (load time) goes to the next one
    this.pendingSize = 0;
    this.lineBuf = '';
    this.exited = new Promise((resolve) => {
      this.proc.on('close', (code, signal) => {
        this.alive = false;
        CHILDREN.delete(this);
        if (this.uid) {
          // Whatever the function left behind goes before the uid is handed out again.
          const uid = this.uid;
          const killer = killUid(uid);
          killer.on('close', () => releaseUid(uid));
          killer.on('error', () => releaseUid(uid));
        }
        this.code = code;
        this.signal = signal;
        resolve();
      });
    });
    this.proc.on('error', (err) => log('ERROR', `child process error: ${err.message}`));
    const chan = this.proc.stdio[3];
    chan.setEncoding('utf8');
    chan.on('data', (text) => this.onChannel(text));
    chan.on('error', () => {});
    for (const stream of [this.proc.stdout, this.proc.stderr]) {
      stream.on('data', (chunk) => this.onLog(chunk.toString('utf8')));
      stream.on('error', () => {});
    }
    this.chan = chan;
    CHILDREN.add(this);
  }

  onLog(text) {
    if (this.execution) {
      this.execution.onLog(text);
    } else if (this.pendingSize < LOG_CAP) {
      this.pending.push(text);
      this.pendingSize += text.length;
    }
  }

  onChannel(text) {
    this.lineBuf += text;
    let nl;
    while ((nl = this.lineBuf.indexOf('\n')) >= 0) {
      const line = this.lineBuf.slice(0, nl);
      this.lineBuf = this.lineBuf.slice(nl + 1);
      let msg;
      try {
        msg = JSON.parse(line);
      } catch (err) {
        continue;
      }
      if (msg.t === 'log') this.onLog(msg.d);
      else if (msg.t === 'result' && this.execution) this.execution.onResult(msg.r);
    }
  }

  send(req) {
    this.chan.write(JSON.stringify(req) + '\n');
  }

  kill() {
    try {
      process.kill(-this.pid, 'SIGKILL');
    } catch (err) {
      // already gone
    }
    if (this.uid) killUid(this.uid);
  }

  retire() {
    this.kill();
  }
}

class Execution {
  constructor(child, req) {
    this.child = child;
    this.req = req;
    this.logs = child.pending;
    this.logSize = child.pendingSize;
    this.dropped = 0;
    child.pending = [];
    child.pendingSize = 0;
    this.result = null;
    this.timedOut = false;
    this.cancelled = false;
  }

  cancel() {
    // Nobody waits for this execution any more: the function must stop, not run on unseen.
    this.cancelled = true;
    this.child.kill();
  }

  onLog(text) {
    const room = LOG_CAP - this.logSize;
    if (text.length > room) {
      if (room > 0) this.logs.push(text.slice(0, room));
      this.dropped += text.length - Math.max(room, 0);
      this.logSize = LOG_CAP;
    } else {
      this.logs.push(text);
      this.logSize += text.length;
    }
  }

  onResult(result) {
    this.result = result;
    if (this.resolveDone) this.resolveDone();
  }

  async run() {
    const child = this.child;
    const timeout = Number(this.req.timeout || 0);
    const started = process.hrtime.bigint();
    child.execution = this;
    const done = new Promise((resolve) => { this.resolveDone = resolve; });
    const timer = timeout > 0 ? setTimeout(() => { this.timedOut = true; child.kill(); }, timeout * 1000) : null;
    try {
      child.send({ execution_id: this.req.execution_id, input: this.req.input === undefined ? null : this.req.input,
        context: this.req.context || {} });
      if (this.cancelled) child.kill(); // cancelled before it was handed to the child
      await Promise.race([done, child.exited]);
      if (this.result === null) await child.exited; // dead: wait for the last of its output (a V8 OOM message)
    } finally {
      if (timer) clearTimeout(timer);
      child.execution = null;
    }
    const duration = Math.round(Number(process.hrtime.bigint() - started) / 1e6) / 1000;
    return this.reply(duration);
  }

  reply(duration) {
    let result = this.result;
    let text = this.logs.join('');
    if (result === null) {
      const { code, signal } = this.child;
      if (this.timedOut) {
        result = { status: 'failed', reason: 'timeout', output: TIMEOUT_OUTPUT };
      } else if (this.cancelled) {
        result = { status: 'failed', reason: 'cancelled', output: CANCELLED_OUTPUT };
      } else if (signal === 'SIGXFSZ') {
        result = { status: 'failed', reason: 'files', output: 'Function exceeded its file size limit.' };
      } else if (signal === 'SIGXCPU') {
        result = { status: 'failed', reason: 'cpu', output: 'Function exceeded its CPU time limit.' };
      } else if (signal === 'SIGKILL' || MEMORY_TEXT.test(text.slice(-4096))) {
        // An outside SIGKILL (the OOM killer, a cgroup limit) or V8 giving up: memory.
        result = { status: 'failed', reason: 'memory', output: 'Function exceeded its memory limit.' };
      } else {
        result = { status: 'failed', reason: 'crashed', output: describeDeath(code, signal) };
      }
    }
    if (this.dropped) text += `\n[logs truncated: ${this.dropped} more bytes were dropped]\n`;
    const ok = result.status === 'success';
    return {
      success: ok,
      status: ok ? 'success' : 'failed',
      reason: result.reason || (ok ? 'ok' : 'error'),
      output: result.output === undefined ? null : result.output,
      duration,
      logs: text,
    };
  }
}

class Server {
  constructor(workDir, token) {
    // The credential the engine drives this server with: a function may reach the port, so
    // /execute and /cancel answer only requests that carry it. Only its digest is kept.
    this.authorization = crypto.createHash('sha256').update(`Bearer ${token}`).digest();
    this.packages = new Packages(workDir, SANDBOX.uids);
    this.idle = new Map(); // key -> warm children
    this.running = new Map(); // key -> executions running
    this.waiting = new Map(); // key -> resolvers of requests waiting for a slot, oldest first
    this.jobs = new Map(); // execution id -> its running /execute jobs, for POST /cancel
    this.stopping = false;
  }

  async slot(key) {
    const running = this.running.get(key) || 0;
    if (running < MAX_CHILDREN) {
      this.running.set(key, running + 1);
      return;
    }
    await new Promise((resolve) => {
      if (!this.waiting.has(key)) this.waiting.set(key, []);
      this.waiting.get(key).push(resolve);
    }); // the releaser hands its slot over: the count stays the same
  }

  release(key) {
    const queue = this.waiting.get(key);
    if (queue && queue.length) {
      queue.shift()();
      return;
    }
    this.running.set(key, (this.running.get(key) || 1) - 1);
  }

  async execute(req, job = { cancelled: false, execution: null }) {
    const executionId = req.execution_id;
    let pkgDir;
    try {
      pkgDir = await this.packages.unpack(req.package || {});
    } catch (err) {
      log('WARNING', `execution ${executionId}: ${err.message}`);
      return { success: false, status: 'failed', reason: 'error', output: err.message, duration: 0, logs: '' };
    }
    const raw = req.limits || {};
    const limits = {};
    for (const k of ['memory_size', 'processes', 'files', 'file_size']) if (raw[k]) limits[k] = raw[k];
    const entry = req.entry || 'main.main';
    const key = JSON.stringify([pkgDir, entry, limits]);
    await this.slot(key);
    try {
      if (job.cancelled) return cancelledReply(0); // cancelled while it waited for a slot
      return await this.executeInChild(key, pkgDir, entry, limits, req, executionId, job);
    } finally {
      this.release(key);
    }
  }

  async executeInChild(key, pkgDir, entry, limits, req, executionId, job) {
    if (!this.idle.has(key)) this.idle.set(key, []);
    const idle = this.idle.get(key);
    let child = null;
    while (idle.length && child === null) {
      const candidate = idle.pop();
      if (candidate.alive) child = candidate;
    }
    try {
      if (child === null) child = new Child(pkgDir, entry, limits);
    } catch (err) {
      log('ERROR', `execution ${executionId}: cannot start a child: ${err.message}`);
      return { success: false, status: 'failed', reason: 'crashed', output: `Runtime could not start the execution: ${err.message}`, duration: 0, logs: '' };
    }
    const execution = new Execution(child, req);
    job.execution = execution;
    if (job.cancelled) execution.cancelled = true;
    const reply = await execution.run();
    const leftovers = Boolean(execution.result && execution.result.leftovers);
    if (child.alive && reply.reason !== 'timeout' && !execution.cancelled && !leftovers && !this.stopping) {
      if (idle.length < IDLE_CHILDREN) idle.push(child);
      else child.retire();
    } else {
      // Timed out, cancelled, crashed, or left processes running: the whole tree goes, a fresh child replaces it.
      child.kill();
      if (!idle.length && !this.stopping) setImmediate(() => this.spare(key, pkgDir, entry, limits));
    }
    return reply;
  }

  spare(key, pkgDir, entry, limits) {
    const idle = this.idle.get(key) || [];
    if (idle.length || this.stopping) return;
    try {
      idle.push(new Child(pkgDir, entry, limits));
      this.idle.set(key, idle);
    } catch (err) {
      log('WARNING', `cannot start a spare child: ${err.message}`);
    }
  }

  cancel(executionId) {
    // Cancel the running (or queued) executions with this id; returns how many there were.
    const jobs = executionId ? [...(this.jobs.get(executionId) || [])] : [];
    for (const job of jobs) cancelJob(job);
    if (jobs.length) log('INFO', `execution ${executionId}: cancel requested`);
    return jobs.length;
  }

  track(job) {
    if (!job.id) return;
    if (!this.jobs.has(job.id)) this.jobs.set(job.id, new Set());
    this.jobs.get(job.id).add(job);
  }

  untrack(job) {
    const jobs = this.jobs.get(job.id);
    if (!jobs) return;
    jobs.delete(job);
    if (!jobs.size) this.jobs.delete(job.id);
  }

  close() {
    this.stopping = true;
    for (const child of CHILDREN) child.kill();
    this.idle.clear();
  }

  authorized(req) {
    const given = crypto.createHash('sha256').update(String(req.headers.authorization || '')).digest();
    return crypto.timingSafeEqual(given, this.authorization);
  }

  handle(req, res) {
    const send = (status, body, type = 'text/plain') => {
      res.writeHead(status, { 'Content-Type': type, 'Content-Length': Buffer.byteLength(body) });
      res.end(body);
    };
    const url = req.url.split('?')[0];
    if (url === '/ping') {
      req.resume();
      send(200, 'pong');
      return;
    }
    if (url !== '/execute' && url !== '/cancel') {
      req.resume();
      send(404, 'not found');
      return;
    }
    if (!this.authorized(req)) {
      req.resume();
      send(401, 'missing or wrong runtime credential');
      return;
    }
    if (req.method !== 'POST') {
      req.resume();
      send(405, 'use POST');
      return;
    }
    const chunks = [];
    let size = 0;
    let tooBig = false;
    req.on('data', (c) => {
      size += c.length;
      if (size > MAX_BODY) tooBig = true;
      else chunks.push(c);
    });
    req.on('end', () => {
      if (tooBig) {
        send(413, 'request too large');
        return;
      }
      let body;
      try {
        body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
        if (body === null || typeof body !== 'object' || Array.isArray(body)) throw new Error('body must be a JSON object');
      } catch (err) {
        send(400, `invalid JSON body: ${err.message}`);
        return;
      }
      if (url === '/cancel') {
        send(200, JSON.stringify({ cancelled: this.cancel(String(body.execution_id || '')) }), 'application/json');
        return;
      }
      const job = { id: body.execution_id ? String(body.execution_id) : '', cancelled: false, execution: null };
      this.track(job);
      res.on('close', () => {
        if (res.writableFinished) return;
        // The client hung up before the answer (an engine whose execute call was cancelled):
        // nobody will read the result, so the function stops now.
        log('INFO', `execution ${job.id}: the client hung up; cancelling it`);
        cancelJob(job);
      });
      this.execute(body, job).then(
        (reply) => {
          this.untrack(job);
          if (!res.destroyed) send(200, JSON.stringify(reply), 'application/json');
        },
        (err) => {
          this.untrack(job);
          log('ERROR', `internal error: ${err.stack || err}`);
          if (!res.destroyed) send(500, `runtime internal error: ${err.message}`);
        },
      );
    });
  }
}

function cancelJob(job) {
  job.cancelled = true;
  if (job.execution) job.execution.cancel();
}

function cancelledReply(duration) {
  return { success: false, status: 'failed', reason: 'cancelled', output: CANCELLED_OUTPUT, duration, logs: '' };
}

function measureBaseline() {
  // VmData of a child right after start-up, before it loads any function: the memory limit is
  // counted on top of it.
  const probe = cp.spawnSync(process.execPath, ['--preserve-symlinks', __filename, '--probe'], { encoding: 'utf8', timeout: 20000 });
  const value = parseInt((probe.stdout || '').trim(), 10);
  return Number.isFinite(value) && value > 0 ? value : 64 * 1024 * 1024;
}

function vmData() {
  const m = /VmData:\s+(\d+) kB/.exec(fs.readFileSync('/proc/self/status', 'utf8'));
  return m ? Number(m[1]) * 1024 : 0;
}

function serverMain(args) {
  const opt = (name, dflt) => {
    const i = args.indexOf(name);
    return i >= 0 && i + 1 < args.length ? args[i + 1] : dflt;
  };
  // In a pool pod the engine sets these (the pod's own IP, the configured port), so the image's own
  // entrypoint serves without a command of the engine's.
  const host = opt('--host', process.env.HEADWATER_RUNTIME_HOST || '0.0.0.0');
  const port = Number(opt('--port', process.env.HEADWATER_RUNTIME_PORT || '9090'));
  const workDir = opt('--work-dir', path.join(os.tmpdir(), 'headwater-nodejs'));
  const parentPid = Number(opt('--parent-pid', '0'));
  const sandbox = opt('--sandbox', process.env.HEADWATER_RUNTIME_SANDBOX || 'auto');
  if (!['auto', 'uid', 'off'].includes(sandbox)) {
    process.stderr.write(`--sandbox must be auto, uid or off, not ${sandbox}\n`);
    process.exit(2);
  }
  if (sandbox === 'uid' && process.geteuid() !== 0) {
    process.stderr.write('--sandbox uid needs root (it switches each child to a uid of its own)\n');
    process.exit(2);
  }
  process.umask(0o022);
  SANDBOX.uids = sandbox === 'uid' || (sandbox === 'auto' && process.geteuid() === 0);
  SANDBOX.baselineData = measureBaseline();
  SANDBOX.network = opt('--network', process.env.HEADWATER_RUNTIME_NETWORK || 'none');
  SANDBOX.scratchSize = Number(opt('--scratch-size', String(SANDBOX.scratchSize)));
  if (!['none', 'host'].includes(SANDBOX.network) || !(SANDBOX.scratchSize > 0)) {
    process.stderr.write('--network must be none or host, and --scratch-size a positive number of bytes\n');
    process.exit(2);
  }
  // The credential: given by the engine (a pod's environment), or made here and announced to the
  // parent on the LISTENING line; either way it leaves the environment children could inherit.
  let token = process.env.HEADWATER_RUNTIME_TOKEN || '';
  delete process.env.HEADWATER_RUNTIME_TOKEN;
  const announce = !token;
  if (!token) token = crypto.randomBytes(32).toString('base64url');
  const many = (name, envName, sep) => {
    const values = (process.env[envName] || '').split(sep).filter(Boolean);
    args.forEach((a, i) => { if (a === name && i + 1 < args.length) values.push(args[i + 1]); });
    return values;
  };
  PACKAGE_SOURCES.dirs = many('--package-dir', 'HEADWATER_RUNTIME_PACKAGE_DIRS', ':').map((d) => {
    try {
      return fs.realpathSync(d);
    } catch (err) {
      return path.resolve(d);
    }
  });
  PACKAGE_SOURCES.urls = many('--package-url', 'HEADWATER_RUNTIME_PACKAGE_URLS', ' ').filter((u) => /^https?:\/\//.test(u));
  const server = new Server(workDir, token);
  const httpServer = http.createServer((req, res) => server.handle(req, res));
  httpServer.keepAliveTimeout = 65000;
  httpServer.requestTimeout = 0; // executions may run for the function's whole timeout
  const stop = () => {
    server.close();
    httpServer.close();
    setTimeout(() => process.exit(0), 50);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  if (parentPid) {
    // Exit with the engine that started us, even if it died without cleaning up.
    setInterval(() => { if (process.ppid !== parentPid) stop(); }, 1000).unref();
  }
  httpServer.listen(port, host, () => {
    const addr = httpServer.address();
    process.stdout.write(`LISTENING ${addr.address}:${addr.port}${announce ? ` ${token}` : ''}\n`);
  });
}

// ------------------------------------------------------------------------------------------------
// The child process: loads the entry once, then serves one request at a time

class ExitCalled extends Error {}

function classify(err) {
  const code = err && err.code;
  if (code === 'EMFILE' || code === 'ENFILE' || code === 'EFBIG') return 'files';
  if (code === 'EAGAIN' && /spawn|fork/.test(String(err.syscall || ''))) return 'processes';
  if (err instanceof RangeError && MEMORY_TEXT.test(err.message)) return 'memory';
  return 'error';
}

function childMain() {
  const pkg = process.env.HW_PKG;
  const realPkg = process.env.HW_PKG_REAL;
  const entry = process.env.HW_ENTRY || 'main.main';
  const sandboxed = process.env.HW_SANDBOXED === '1';
  for (const k of Object.keys(process.env)) if (k.startsWith('HW_')) delete process.env[k];
  const chan = new net.Socket({ fd: 3, readable: true, writable: true });
  const send = (msg) => chan.write(JSON.stringify(msg) + '\n');
  // Console output goes over the channel, so it arrives before the result it belongs to.
  for (const stream of [process.stdout, process.stderr]) {
    stream.write = (chunk, encoding, cb) => {
      send({ t: 'log', d: typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8') });
      const callback = typeof encoding === 'function' ? encoding : cb;
      if (typeof callback === 'function') process.nextTick(callback);
      return true;
    };
  }
  const realExit = process.exit.bind(process);
  const serverPid = process.ppid;
  // The server's parent-death cannot be signalled to us (no prctl in Node): look for it instead.
  setInterval(() => { if (process.ppid !== serverPid) realExit(0); }, 1000).unref();
  // process.exit() in a function is a failure of that execution, not the end of a warm child.
  process.exit = (code) => { throw new ExitCalled(`Function called process.exit(${code === undefined ? '' : code}).`); };
  // Anything that starts a process marks the execution, so the server can end what it left running.
  let spawned = false;
  const origSpawn = cp.ChildProcess.prototype.spawn;
  cp.ChildProcess.prototype.spawn = function patchedSpawn(...a) { spawned = true; return origSpawn.apply(this, a); };
  for (const name of ['spawnSync', 'execSync', 'execFileSync']) {
    const orig = cp[name];
    cp[name] = function patchedSync(...a) { spawned = true; return orig.apply(this, a); };
  }
  const hasLeftovers = () => {
    if (!spawned) return false;
    if (!sandboxed) return true; // cannot tell what still runs: recycle to be sure
    try {
      process.kill(-1, 0); // as the sandbox uid: succeeds only if another process of it exists
      return true;
    } catch (err) {
      return false;
    }
  };
  const cleanStack = (err) => {
    let text = (err && err.stack) || String(err);
    for (const prefix of [pkg + '/', realPkg + '/']) text = text.split(prefix).join('');
    return text.split('\n').filter((l) => !l.includes(__filename) && !/node:(internal|events)/.test(l)).join('\n');
  };

  let handler = null;
  let loadError = null;
  const dot = entry.lastIndexOf('.');
  if (dot <= 0 || dot === entry.length - 1) {
    loadError = `Invalid entry ${JSON.stringify(entry)}: expected 'module.function'.`;
  } else {
    const modName = entry.slice(0, dot);
    const fnName = entry.slice(dot + 1);
    try {
      const mod = require(path.join(pkg, modName));
      handler = mod && mod[fnName];
      if (typeof handler !== 'function') loadError = `Module ${JSON.stringify(modName)} has no function ${JSON.stringify(fnName)}.`;
    } catch (err) {
      process.stderr.write(cleanStack(err) + '\n');
      loadError = `Failed to load module ${JSON.stringify(modName)}: ${err && err.message}`;
    }
  }

  let current = null; // the running execution's finish(), for errors raised outside its promise
  const finish = (result) => {
    if (current === null) return;
    current = null;
    result.leftovers = hasLeftovers();
    let line;
    try {
      line = JSON.stringify({ t: 'result', r: result });
    } catch (err) {
      const type = typeof result.output === 'bigint' ? 'bigint' : (result.output && result.output.constructor && result.output.constructor.name) || typeof result.output;
      const message = `Function returned a value that is not JSON serialisable (${type}): ${err.message}`;
      send({ t: 'log', d: message + '\n' });
      line = JSON.stringify({ t: 'result', r: { status: 'failed', reason: 'error', output: message, leftovers: result.leftovers } });
    }
    chan.write(line + '\n');
  };
  const fail = (err) => {
    process.stderr.write(cleanStack(err) + '\n');
    const reason = classify(err);
    let output = (err && err.message) || String(err);
    if (reason === 'processes') output = `Function reached its process limit: ${output}`;
    finish({ status: 'failed', reason, output });
  };
  process.on('uncaughtException', (err) => (current ? fail(err) : process.stderr.write(cleanStack(err) + '\n')));
  process.on('unhandledRejection', (err) => (current ? fail(err) : process.stderr.write(cleanStack(err) + '\n')));

  const run = async (req) => {
    spawned = false;
    current = finish;
    if (loadError !== null) {
      finish({ status: 'failed', reason: 'error', output: loadError });
      return;
    }
    try {
      let output = handler(req.context || {}, req.input === undefined ? null : req.input);
      if (output && typeof output.then === 'function') output = await output;
      finish({ status: 'success', reason: 'ok', output: output === undefined ? null : output });
    } catch (err) {
      fail(err);
    }
  };

  let buf = '';
  const queue = [];
  let busy = false;
  const pump = async () => {
    if (busy) return;
    busy = true;
    while (queue.length) await run(queue.shift());
    busy = false;
  };
  chan.setEncoding('utf8');
  chan.on('data', (text) => {
    buf += text;
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      queue.push(JSON.parse(buf.slice(0, nl)));
      buf = buf.slice(nl + 1);
    }
    pump();
  });
  chan.on('end', () => realExit(0)); // retired by the server, or the server died
}

if (process.argv.includes('--probe')) {
  process.stdout.write(`${vmData()}\n`);
} else if (process.argv.includes('--child')) {
  childMain();
} else if (require.main === module) {
  serverMain(process.argv.slice(2));
}
