//! Child processes that are killed when dropped, and port helpers.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("the OS hands out a free port")
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Sends one line and reads whatever comes back first (for PING-style probes).
pub fn probe(port: u16, send: &[u8]) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300)).ok()?;
    stream.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    if !send.is_empty() {
        stream.write_all(send).ok()?;
    }
    let mut buf = [0u8; 256];
    let n = stream.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The repository root (the folder holding `Cargo.lock`).
pub fn workspace_root() -> PathBuf {
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    while !dir.join("Cargo.lock").exists() {
        if !dir.pop() {
            return PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        }
    }
    dir
}

/// Finds a binary: the environment variable, then candidates, then `PATH`.
pub(crate) fn locate(var: &str, candidates: &[PathBuf], name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(var).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return found.clone();
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!("{name} not found: set {var} or run deploy/local/install.sh");
}

/// The repository's local venv `site-packages` folders (any Python version).
pub(crate) fn venv_site_packages() -> Vec<PathBuf> {
    let lib = workspace_root().join(".local/venv/lib");
    std::fs::read_dir(&lib)
        .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path().join("site-packages")).collect())
        .unwrap_or_default()
}

/// A server process owned by a test: killed (SIGKILL) and reaped on drop.
pub struct ServerProcess {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    envs: Vec<(String, String)>,
    dir: Option<PathBuf>,
    child: Option<Child>,
}

impl ServerProcess {
    /// Starts `program args`, appending its output to `log`.
    pub fn start(name: &str, program: &Path, args: &[String], log: &Path) -> Self {
        Self::start_with_env(name, program, args, &[], log)
    }

    /// Starts `program args` with extra environment variables.
    pub fn start_with_env(name: &str, program: &Path, args: &[String], envs: &[(String, String)], log: &Path) -> Self {
        Self::launch(name, program, args, envs, None, log)
    }

    /// Starts `program args` in the working directory `dir` (relative paths the
    /// program writes, such as a database file, land there).
    pub fn start_in(name: &str, program: &Path, args: &[String], dir: &Path, log: &Path) -> Self {
        Self::launch(name, program, args, &[], Some(dir), log)
    }

    fn launch(
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(String, String)],
        dir: Option<&Path>,
        log: &Path,
    ) -> Self {
        let mut process = Self {
            name: name.to_owned(),
            program: program.to_owned(),
            args: args.to_vec(),
            log: log.to_owned(),
            envs: envs.to_vec(),
            dir: dir.map(Path::to_owned),
            child: None,
        };
        process.spawn();
        process
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("cannot open log {}: {e}", self.log.display()));
        let err = log.try_clone().expect("clone log handle");
        let mut command = Command::new(&self.program);
        if let Some(dir) = &self.dir {
            command.current_dir(dir);
        }
        let child = command
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} ({}): {e}", self.name, self.program.display()));
        self.child = Some(child);
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`, ...).
    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status();
        }
    }

    /// SIGTERM, then waits up to `timeout` for a clean exit; returns the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.signal("TERM");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Some(status);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        None
    }

    /// Sets (or replaces) an environment variable for the next `restart`.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.envs.retain(|(k, _)| k != key);
        self.envs.push((key.to_owned(), value.to_owned()));
    }

    /// Starts the same command again (after `kill`).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The last `lines` lines of the log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            // A paused process must be resumed to die promptly.
            let _ = Command::new("kill").arg("-CONT").arg(pid.to_string()).status();
        }
        self.kill();
    }
}
