//! The `agentops-agent-run` binary against a fake controller: commands run in a clean
//! temporary directory, failures are classified, and SIGTERM hands held tasks back.

use crate::common;

use std::process::Stdio;
use std::time::Duration;

use common::{Fake, id, task};
use serde_json::{Value, json};

fn run(argv: &[&str]) -> Value {
    json!({"run": {"command": argv}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_commands_and_hands_back_its_tasks_on_sigterm() {
    let fake = Fake::start().await;
    let scratch = tempfile::tempdir().unwrap();
    let pid_file = scratch.path().join("sleeper.pid");

    fake.push(task(
        "echo",
        run(&["sh", "-c", "echo out; echo err >&2; pwd; env"]),
    ));
    fake.push(task(
        "exit",
        run(&["sh", "-c", "echo first >&2; echo last words >&2; exit 3"]),
    ));
    fake.push(task("prompt", json!({"prompt": "write a poem"})));
    fake.push(task("missing", run(&["agentops-no-such-program"])));
    fake.push(task(
        "loud",
        run(&["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x"]),
    ));
    let agent = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentops-agent-run"))
        .args([
            "--api",
            &fake.url,
            "--name",
            "runner-1",
            "--capabilities",
            "shell,git",
        ])
        .args(["--concurrency", "2"])
        .env("AGENTOPS_TEST_SECRET", "do-not-leak")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    fake.wait_until("five tasks are reported", |s| {
        s.completed.len() + s.failed.len() == 5
    })
    .await;
    // A grandchild, which outlives its shell unless the whole process group is killed.
    let sleeper = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
    fake.push(task("sleeper", run(&["sh", "-c", &sleeper])));
    fake.wait_until("the sleeper runs", |_| pid_file.exists())
        .await;
    fake.wait_until("the sleeper is heartbeaten", |s| s.heartbeats > 2)
        .await;

    let pid = agent.id().unwrap() as libc::pid_t;
    // SAFETY: signals our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let output = tokio::time::timeout(Duration::from_secs(5), agent.wait_with_output())
        .await
        .expect("the agent exits within 5 s of SIGTERM")
        .unwrap();
    println!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{}", output.status);

    fake.assert_clean();
    fake.with(|s| {
        let registration = &s.registrations[0];
        assert_eq!(registration["name"], "runner-1");
        assert_eq!(registration["type"], "seed");
        assert_eq!(registration["capabilities"], json!(["shell", "git"]));
        assert_eq!(registration["concurrency"], 2);

        let result = |name: &str| {
            let found = s.completed.iter().find(|(task, _)| *task == id(name));
            found
                .unwrap_or_else(|| panic!("{name} completed"))
                .1
                .clone()
        };
        let echo = result("echo");
        assert_eq!(echo["exit_code"], 0);
        assert_eq!(echo["stderr"], "err\n");
        let stdout = echo["stdout"].as_str().unwrap();
        let mut lines = stdout.lines();
        assert_eq!(lines.next(), Some("out"));
        let workdir = std::path::Path::new(lines.next().unwrap());
        assert_ne!(workdir, std::env::current_dir().unwrap());
        assert!(!workdir.exists(), "the task's directory is removed");
        assert!(stdout.contains("PATH="), "{stdout}");
        assert!(!stdout.contains("AGENTOPS_TEST_SECRET"), "{stdout}");
        // HOME and TMPDIR are the task's own, removed with its directory.
        let task_dir = workdir.parent().unwrap();
        for variable in ["HOME", "TMPDIR"] {
            let value = stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{variable}=")))
                .unwrap_or_else(|| panic!("no {variable}: {stdout}"));
            assert!(
                std::path::Path::new(value).starts_with(task_dir),
                "{variable}={value} is outside {}",
                task_dir.display()
            );
        }
        assert!(stdout.contains("LANG=C.UTF-8"), "{stdout}");

        let loud = result("loud");
        assert_eq!(loud["stdout"].as_str().unwrap().len(), 64 * 1024);

        let failure = |name: &str| {
            let found = s.failed.iter().find(|(task, _, _)| *task == id(name));
            let (_, error, retryable) = found.unwrap_or_else(|| panic!("{name} failed"));
            (error.clone(), *retryable)
        };
        let (error, retryable) = failure("exit");
        assert!(retryable);
        assert!(error.contains("exit status: 3"), "{error}");
        assert!(error.ends_with("first\nlast words"), "{error}");
        let (error, retryable) = failure("prompt");
        assert!(!retryable, "{error}");
        let (error, retryable) = failure("missing");
        assert!(!retryable, "{error}");
        assert!(error.contains("agentops-no-such-program"), "{error}");

        assert_eq!(s.released, [id("sleeper")]);
    });

    let sleeper: libc::pid_t = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    fake.wait_until("the sleeper is killed", |_| !alive(sleeper))
        .await;
}

/// Whether a process runs; a zombie (killed, not yet reaped by whoever inherited it) does not.
fn alive(pid: libc::pid_t) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command, which is in parentheses and may contain spaces.
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}
