//! Real processes: the controller (`agentops up`) and agents (`agentops-agent-run`), killed
//! with their process groups when the test ends.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;

/// A child process that cannot outlive the test: dropping it (also while a test panics)
/// SIGKILLs its whole process group and reaps it. Its stdout and stderr are appended to `log`.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Spawns `command` as the leader of a new process group.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> Proc {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        writeln!(file, "--- {name}: {command:?}").unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({command:?}): {e}"));
        Proc {
            name: name.to_owned(),
            log: log.to_owned(),
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the process is still running (not yet exited, not killed by us).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// How it ended, if it has.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().expect("try_wait")
    }

    /// SIGKILL to the process group, then reap. Does nothing once done.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signals a process group we created; ESRCH once it is gone is harmless.
            unsafe {
                libc::killpg(child.id() as libc::pid_t, libc::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` to the process group without reaping (SIGSTOP, SIGCONT, …).
    pub fn signal_group(&self, signal: libc::c_int) {
        let pid = self.pid() as libc::pid_t;
        assert!(pid > 0, "{} is not running", self.name);
        // SAFETY: signals a process group we created.
        let rc = unsafe { libc::killpg(pid, signal) };
        assert_eq!(rc, 0, "killpg({pid}, {signal}) for {}", self.name);
    }

    /// The last `lines` lines of the log, to explain a failure.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Processes that are not our children but were started on our behalf (a task's command,
/// which the agent runs in a process group of its own and which a SIGKILLed agent leaves
/// behind): SIGKILLed on drop if they still run. Each is known by its pid and start time, so a
/// pid the system has given to another process since is left alone.
#[derive(Default)]
pub struct Strays(Vec<(u32, u64)>);

impl Strays {
    /// Remembers `pid` if it is running now.
    pub fn add(&mut self, pid: u32) {
        if let Some(started) = start_time(pid)
            && !self.0.contains(&(pid, started))
        {
            self.0.push((pid, started));
        }
    }
}

impl Drop for Strays {
    fn drop(&mut self) {
        for (pid, started) in &self.0 {
            if start_time(*pid) == Some(*started) {
                // SAFETY: signals the very process we recorded (same pid, same start time).
                unsafe {
                    libc::kill(*pid as libc::pid_t, libc::SIGKILL);
                }
            }
        }
    }
}

/// A running process's start time (clock ticks since boot), from `/proc/PID/stat`; `None`
/// when there is no such process or it is a zombie.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the parenthesised command name: state is the first, starttime the 20th.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    start_time(pid).is_some()
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// `command` without any `AGENTOPS_*` or `RUST_LOG` variable of the caller's environment.
pub fn clean_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let key_text = key.to_string_lossy();
        if key_text.starts_with("AGENTOPS_") || key_text == "RUST_LOG" {
            command.env_remove(key);
        }
    }
}

/// The `agentops-agent-run` binary, built next to the `agentops` binary under test.
///
/// Cargo builds another package's binary for an integration test only when that package is
/// tested too (`cargo test --workspace` does, `cargo test -p agentops` does not), so this runs
/// `cargo build --workspace --bin agentops-agent-run` once per test process, into the same
/// target directory and profile: a no-op when the binary is fresh, a rebuild when `agents/`
/// changed since. `--workspace` gives its dependencies the features `cargo test --workspace`
/// gives them, so that neither build undoes the other's. When cargo cannot run (no `CARGO` in the environment), an existing
/// binary is used as it is.
pub fn agent_run_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let controller = Path::new(env!("CARGO_BIN_EXE_agentops"));
        let dir = controller.parent().expect("the binary's directory");
        let bin = dir.join(format!(
            "agentops-agent-run{}",
            std::env::consts::EXE_SUFFIX
        ));
        let profile = dir.file_name().and_then(|p| p.to_str()).unwrap_or("debug");
        let target_dir = dir.parent().expect("the target directory");
        let cargo = std::env::var_os("CARGO");
        if let Some(cargo) = &cargo {
            let mut build = Command::new(cargo);
            build
                .args(["build", "--quiet", "--workspace"])
                .args(["--bin", "agentops-agent-run"])
                .arg("--target-dir")
                .arg(target_dir)
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            match profile {
                "debug" => {}
                "release" => {
                    build.arg("--release");
                }
                other => {
                    build.args(["--profile", other]);
                }
            }
            let status = build
                .status()
                .unwrap_or_else(|e| panic!("run {build:?}: {e}"));
            assert!(status.success(), "{build:?} failed: {status}");
        }
        assert!(
            bin.exists(),
            "{} is missing (CARGO is {cargo:?}): run `cargo build -p agentops-agents` or `cargo \
             test --workspace`",
            bin.display()
        );
        bin
    })
    .clone()
}

/// `agentops up` on a repository and a database, on a fixed loopback port so that it can be
/// killed and restarted where its agents expect it.
pub struct Controller {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    args: Vec<std::ffi::OsString>,
    data_dir: PathBuf,
    log: PathBuf,
    /// How many times it was started.
    pub starts: usize,
    pub proc: Option<Proc>,
}

impl Controller {
    /// Starts `agentops up` with a data directory and log under `dir`, and returns without
    /// waiting for it to be ready.
    pub fn start(database: &str, repo: &Path, dir: &Path, lease: &str, heartbeat: &str) -> Self {
        Controller::start_with(database, repo, dir, lease, heartbeat, &[])
    }

    /// [`Self::start`] on a repository path or URL, with `extra` flags for `up`.
    pub fn start_with(
        database: &str,
        repo: impl Into<std::ffi::OsString>,
        dir: &Path,
        lease: &str,
        heartbeat: &str,
        extra: &[&str],
    ) -> Self {
        let repo: std::ffi::OsString = repo.into();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let data_dir = dir.join("data");
        std::fs::create_dir_all(&data_dir).unwrap();
        let mut args: Vec<std::ffi::OsString> = vec![
            "up".into(),
            "--repo".into(),
            repo,
            "--database".into(),
            database.into(),
            "--listen".into(),
            addr.to_string().into(),
            "--lease".into(),
            lease.into(),
            "--heartbeat".into(),
            heartbeat.into(),
            // The tests run their own agents and count what each did.
            "--no-agents".into(),
        ];
        args.extend(extra.iter().map(Into::into));
        let mut controller = Controller {
            url: format!("http://{addr}"),
            args,
            data_dir,
            log: dir.join("controller.log"),
            starts: 0,
            proc: None,
        };
        controller.spawn();
        controller
    }

    /// (Re)starts the process: same flags, database, repository, data directory and port.
    pub fn spawn(&mut self) {
        assert!(
            !self.proc.as_mut().is_some_and(Proc::is_running),
            "the controller is already running"
        );
        let mut command = Command::new(env!("CARGO_BIN_EXE_agentops"));
        clean_env(&mut command);
        command
            .args(&self.args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("AGENTOPS_LOG", "warn")
            .current_dir(&self.data_dir);
        self.starts += 1;
        let name = format!("controller #{}", self.starts);
        self.proc = Some(Proc::spawn(&name, command, &self.log));
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }

    /// Waits until `/readyz` answers 200 (the first sync reached the store). A process that
    /// exits because the port is still taken is started again, a few times; any other exit,
    /// or no readiness within `timeout`, fails the test with the end of the log.
    pub async fn wait_ready(&mut self, timeout: std::time::Duration) {
        self.wait_for_readyz(timeout, |status| status == reqwest::StatusCode::OK)
            .await;
    }

    /// Waits until the API answers at all: it serves agents from then on, while the first
    /// sync may still be running (`/readyz` 503). Restarts and failures as in [`Self::wait_ready`].
    pub async fn wait_serving(&mut self, timeout: std::time::Duration) {
        self.wait_for_readyz(timeout, |_| true).await;
    }

    async fn wait_for_readyz(
        &mut self,
        timeout: std::time::Duration,
        accept: impl Fn(reqwest::StatusCode) -> bool,
    ) {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(2))
            .build()
            .unwrap();
        let deadline = std::time::Instant::now() + timeout;
        let mut respawns = 0;
        loop {
            if let Ok(answer) = http.get(format!("{}/readyz", self.url)).send().await
                && accept(answer.status())
            {
                return;
            }
            if !self.is_running() {
                let status = self.proc.as_mut().and_then(Proc::exit_status);
                let log = self.log_tail(5);
                respawns += 1;
                assert!(
                    log.contains("Address already in use") && respawns <= 5,
                    "the controller exited ({status:?}):\n{}",
                    self.log_tail(40)
                );
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                self.kill();
                self.spawn();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the controller did not answer as awaited within {timeout:?}:\n{}",
                self.log_tail(40)
            );
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

/// `agentops-agent-run` against `api`: a `seed` agent named `name` running `concurrency`
/// tasks at once, logging to `log` (at `info`: a lost lease or a refused report is logged,
/// a task that simply completes is not).
pub fn spawn_agent(api: &str, name: &str, concurrency: usize, log: &Path) -> Proc {
    let mut command = Command::new(agent_run_bin());
    clean_env(&mut command);
    command
        .args(["--api", api, "--name", name, "--type", "seed"])
        .args(["--concurrency", &concurrency.to_string()])
        .env("RUST_LOG", "info");
    Proc::spawn(name, command, log)
}

/// `agentops agent ROLE --api API --name NAME` with `extra` flags, logging to `log`.
pub fn spawn_agentops_agent(api: &str, role: &str, name: &str, extra: &[&str], log: &Path) -> Proc {
    let mut command = Command::new(env!("CARGO_BIN_EXE_agentops"));
    clean_env(&mut command);
    command
        .args(["agent", role, "--api", api, "--name", name])
        .args(extra)
        .env("RUST_LOG", "info")
        .env("AGENTOPS_LOG", "info");
    Proc::spawn(name, command, log)
}
