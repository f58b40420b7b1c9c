//! [`RunCommand`]: completes a task by running its `run` action.
//!
//! The command (`action.run.command`, an argv: no shell unless it names one) runs in a fresh
//! temporary directory with the [`sandbox_env`] every agent gives its commands, so a task sees
//! neither the agent's secrets nor another task's files. Its exit code and the last 64 KiB of its stdout
//! and stderr are the result; the end of a log is where the errors and the summary are.

use std::ffi::OsString;
use std::io;
use std::process::{ExitStatus, Stdio};

use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::runtime::{Assignment, Handler, Outcome, TaskContext};

/// The most of each output stream kept in the result.
pub const OUTPUT_LIMIT: usize = 64 * 1024;

/// How much of stderr a failure's message carries.
const ERROR_TAIL: usize = 2 * 1024;

#[derive(Debug, Clone, Copy, Default)]
pub struct RunCommand;

impl Handler for RunCommand {
    async fn handle(&self, task: Assignment, _ctx: TaskContext) -> Outcome {
        let Some(argv) = command(&task.action) else {
            return Outcome::fail("this agent runs only `run` actions with a command", false);
        };
        let output = match run(&argv).await {
            Ok(output) => output,
            Err(e) => {
                // A missing or forbidden program stays missing on a retry; anything else
                // (no memory, too many open files) may be the machine's passing state.
                let lasting = matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
                );
                return Outcome::fail(format!("cannot run `{}`: {e}", argv[0]), !lasting);
            }
        };
        if output.status.success() {
            return Outcome::complete(json!({
                "exit_code": output.status.code(),
                "stdout": text(&output.stdout),
                "stderr": text(&output.stderr),
            }));
        }
        let stderr = text(&output.stderr);
        let tail = last_chars(stderr.trim_end(), ERROR_TAIL);
        Outcome::fail(
            format!("`{}` failed ({}): {tail}", argv[0], output.status),
            true,
        )
    }
}

/// `action.run.command`, when it is a non-empty list of strings.
fn command(action: &serde_json::Value) -> Option<Vec<String>> {
    let argv = action.get("run")?.get("command")?.as_array()?;
    let argv: Vec<String> = argv
        .iter()
        .map(|arg| arg.as_str().map(str::to_owned))
        .collect::<Option<_>>()?;
    (!argv.is_empty()).then_some(argv)
}

/// What a finished command left: its exit status and the tails of its output streams.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

async fn run(argv: &[String]) -> io::Result<Output> {
    let dir = tempfile::tempdir()?;
    let (work, home, tmp) = (
        dir.path().join("work"),
        dir.path().join("home"),
        dir.path().join("tmp"),
    );
    for folder in [&work, &home, &tmp] {
        std::fs::create_dir(folder)?;
    }
    run_in(argv, &work, &sandbox_env(&home, &tmp)).await
}

/// The whole environment of a task's command, the same for every agent: what it needs to find
/// programs, a home and a scratch directory (both the task's own), and nothing of the agent's
/// or the controller's (no tokens, no keys, no `AGENTOPS_*`).
pub fn sandbox_env(home: &std::path::Path, tmp: &std::path::Path) -> Vec<(String, OsString)> {
    let mut env = vec![
        ("HOME".to_owned(), home.as_os_str().to_owned()),
        ("TMPDIR".to_owned(), tmp.as_os_str().to_owned()),
        ("LANG".to_owned(), OsString::from("C.UTF-8")),
    ];
    if let Some(path) = std::env::var_os("PATH") {
        env.push(("PATH".to_owned(), path));
    }
    env
}

/// Runs `argv` in `dir` with only the variables `env` gives (nothing is inherited), in its
/// own process group that is killed when the command ends or the future is dropped.
pub async fn run_in(
    argv: &[String],
    dir: &std::path::Path,
    env: &[(String, OsString)],
) -> io::Result<Output> {
    let Some(program) = argv.first() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an empty command",
        ));
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(&argv[1..])
        .current_dir(dir)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a terminal's Ctrl-C reaches the agent, which stops the
        // task itself, and the whole group can be killed when the task is stopped.
        .process_group(0)
        // Also has tokio reap the child.
        .kill_on_drop(true);
    die_with_this_process(&mut command);
    let mut child = command.spawn()?;
    let _group = child.id().map(KillGroup);
    let stdout = tail(child.stdout.take().expect("piped"), OUTPUT_LIMIT);
    let stderr = tail(child.stderr.take().expect("piped"), OUTPUT_LIMIT);
    let (status, stdout, stderr) = tokio::try_join!(child.wait(), stdout, stderr)?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// The command is killed when the agent dies, also by SIGKILL, when no `Drop` runs. Left
/// running, it would go on doing the task's work while the lease runs out and another agent
/// starts the same task: the work done twice.
///
/// Linux sends the signal when the thread that started the command ends. Commands start on
/// the runtime's worker threads, which live as long as the runtime, never on the blocking
/// pool's (those come and go). Only the command itself gets the signal: what it started and
/// detached from itself in the background can outlive a SIGKILLed agent.
fn die_with_this_process(command: &mut tokio::process::Command) {
    #[cfg(target_os = "linux")]
    {
        let agent = std::process::id();
        // SAFETY: between fork and exec the closure makes only async-signal-safe calls
        // (prctl, getppid) and allocates nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The agent died before the prctl: nobody is left to signal us. (ESRCH: an
                // error that needs no allocation, which is not safe here.)
                if libc::getppid() as u32 != agent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

/// Kills what is left of the command's process group: everything it started, when the task
/// is stopped early, and stray background processes when it ends.
struct KillGroup(u32);

impl Drop for KillGroup {
    fn drop(&mut self) {
        // SAFETY: killpg has no memory effects; at worst the group is already gone (ESRCH).
        unsafe {
            libc::killpg(self.0 as libc::pid_t, libc::SIGKILL);
        }
    }
}

/// Reads a stream to its end, keeping only its last `limit` bytes.
async fn tail(mut stream: impl AsyncRead + Unpin, limit: usize) -> io::Result<Vec<u8>> {
    let mut kept = Vec::new();
    let mut chunk = vec![0; 16 * 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&chunk[..n]);
        // Trimming only past twice the limit keeps the copying linear in the output.
        if kept.len() > 2 * limit {
            kept.drain(..kept.len() - limit);
        }
    }
    if kept.len() > limit {
        kept.drain(..kept.len() - limit);
    }
    Ok(kept)
}

/// Output as text; a tail may start inside a UTF-8 sequence, whose leftover bytes are skipped.
pub fn text(bytes: &[u8]) -> String {
    let start = bytes
        .iter()
        .take(3)
        .take_while(|b| (**b & 0b1100_0000) == 0b1000_0000)
        .count();
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

fn last_chars(text: &str, max_bytes: usize) -> &str {
    let mut start = text.len().saturating_sub(max_bytes);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_command_of_a_run_action_only() {
        let argv = command(&json!({"run": {"command": ["echo", "hi"]}}));
        assert_eq!(argv, Some(vec!["echo".to_owned(), "hi".to_owned()]));
        assert_eq!(command(&json!({"prompt": "hi"})), None);
        assert_eq!(command(&json!({"run": {"command": []}})), None);
        assert_eq!(command(&json!({"run": {"command": ["echo", 1]}})), None);
    }

    #[tokio::test]
    async fn keeps_the_last_bytes_of_a_long_stream() {
        let input: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let kept = tail(&input[..], 1000).await.unwrap();
        assert_eq!(kept, input[input.len() - 1000..]);
        assert_eq!(tail(&b"short"[..], 1000).await.unwrap(), b"short");
    }

    #[test]
    fn a_tail_cut_inside_a_character_starts_at_the_next_one() {
        let bytes = "é!".as_bytes();
        assert_eq!(text(&bytes[1..]), "!");
        assert_eq!(last_chars("aé", 1), "");
        assert_eq!(last_chars("aé", 2), "é");
    }

    #[test]
    fn the_environment_holds_no_secret() {
        let env = sandbox_env(std::path::Path::new("/h"), std::path::Path::new("/t"));
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert!(
            names
                .iter()
                .all(|n| ["HOME", "TMPDIR", "LANG", "PATH"].contains(n)),
            "{names:?}"
        );
        assert!(env.contains(&("HOME".to_owned(), "/h".into())));
        assert!(env.contains(&("TMPDIR".to_owned(), "/t".into())));
    }
}
