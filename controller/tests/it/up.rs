//! The `agentops up` process, the real binary on Postgres and a bare Git remote reached by
//! `file://`: stopped by a signal the way Kubernetes and systemd stop it, and what its
//! `/metrics` says about syncs and status pushes.

use crate::common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Backend, Proc, TestDb, eventually, free_port, git};

const BIN: &str = env!("CARGO_BIN_EXE_agentops");
const API: &str = "apiVersion: agentops.dev/v1alpha1";

/// A task the embedded Seed runs for two minutes: longer than any grace period here.
fn sleeping_task(name: &str) -> String {
    format!(
        "{API}\nkind: Task\nmetadata:\n  name: {name}\nspec:\n  title: Sleep {name}\n  retries: 2\n  \
         output: {{mode: none}}\n  action:\n    run:\n      command: [sleep, \"120\"]\n"
    )
}

struct Setup {
    dir: tempfile::TempDir,
    /// Where the API listens.
    addr: String,
    remote: PathBuf,
    db: TestDb,
    log: PathBuf,
}

impl Setup {
    /// Project `p` with two sleeping tasks, pushed to a bare remote.
    async fn new() -> Setup {
        Setup::with_files(&[]).await
    }

    /// The same, with more files (path, text) in the first commit.
    async fn with_files(extra: &[(&str, &str)]) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        std::fs::create_dir_all(work.join("projects/p/tasks")).unwrap();
        std::fs::write(
            work.join("projects/p/project.yaml"),
            format!("{API}\nkind: Project\nmetadata:\n  name: p\nspec:\n  title: Stopping\n"),
        )
        .unwrap();
        for name in ["one", "two"] {
            std::fs::write(
                work.join(format!("projects/p/tasks/{name}.yaml")),
                sleeping_task(name),
            )
            .unwrap();
        }
        for (path, text) in extra {
            std::fs::write(work.join(path), text).unwrap();
        }
        git(&work, &["init", "-q", "-b", "main"]);
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-qm", "specs"]);
        let remote = dir.path().join("remote.git");
        git(
            dir.path(),
            &["clone", "-q", "--bare", "work", remote.to_str().unwrap()],
        );
        let db = TestDb::new(Backend::Postgres).await;
        let migrated = Command::new(BIN)
            .args(["migrate", "--database", &db.url])
            .output()
            .unwrap();
        assert!(migrated.status.success(), "{migrated:?}");
        Setup {
            addr: format!("127.0.0.1:{}", free_port()),
            log: dir.path().join("controller.log"),
            db,
            remote,
            dir,
        }
    }

    /// `up` with the embedded agents. The status interval is an hour, so the only status
    /// commit is the one pushed on the way out.
    fn start(&self, grace: &str) -> Proc {
        self.start_with(&["--shutdown-grace", grace, "--status-interval", "1h"])
    }

    fn start_with(&self, args: &[&str]) -> Proc {
        self.start_as("controller", &self.addr, args)
    }

    /// Another `up` on the same remote and database, with its own address, data and log.
    fn start_as(&self, name: &str, addr: &str, args: &[&str]) -> Proc {
        let mut command = Command::new(BIN);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("AGENTOPS_") {
                command.env_remove(key);
            }
        }
        command
            .arg("up")
            .arg("--repo")
            .arg(format!("file://{}", self.remote.display()))
            .args(["--database", &self.db.url])
            .args(["--listen", addr])
            .args(["--heartbeat", "1s"])
            .args(args)
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("data-{name}")))
            .env_remove("OPENROUTER_API_KEY")
            .env("AGENTOPS_LOG", "info");
        let log = if name == "controller" {
            self.log.clone()
        } else {
            self.dir.path().join(format!("{name}.log"))
        };
        Proc::spawn(name, command, &log)
    }

    async fn both_running(&self, controller: &mut Proc) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(
                controller.is_running(),
                "the controller exited:\n{}",
                controller.log_tail(40)
            );
            let running = self
                .db
                .scalar("SELECT count(*) FROM tasks WHERE status = 'in_progress'")
                .await;
            if running == 2 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the tasks did not both run:\n{}",
                controller.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The status file of project `p` at the remote's head, if there is one.
    fn remote_status(&self) -> Option<serde_json::Value> {
        let out = Command::new("git")
            .args(["show", "main:.agentops/status/p.yaml"])
            .current_dir(&self.remote)
            .output()
            .unwrap();
        out.status.success().then(|| {
            serde_saphyr::from_str(&String::from_utf8_lossy(&out.stdout))
                .expect("the status file is YAML")
        })
    }
}

fn sigterm(proc: &Proc) {
    // SAFETY: signals the process we spawned, not its group: as a container runtime does.
    assert_eq!(
        unsafe { libc::kill(proc.pid() as libc::pid_t, libc::SIGTERM) },
        0
    );
}

async fn wait_exit(proc: &mut Proc, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = proc.exit_status() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "still running {within:?} after the signal:\n{}",
            proc.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sigterm_hands_back_every_lease_pushes_the_status_and_exits_0_within_the_grace() {
    let setup = Setup::new().await;
    let mut controller = setup.start("6s");
    setup.both_running(&mut controller).await;
    assert!(
        setup.remote_status().is_none(),
        "no status was pushed before the stop"
    );

    let signalled = Instant::now();
    sigterm(&controller);
    let status = wait_exit(&mut controller, Duration::from_secs(15)).await;
    let took = signalled.elapsed();
    let log = controller.log_tail(60);
    assert_eq!(status.code(), Some(0), "exit status {status:?}:\n{log}");
    assert!(took < Duration::from_secs(6), "took {took:?}:\n{log}");
    for phase in [
        "stop claiming",
        "hand back",
        "flush status",
        "drain relay",
        "close API",
    ] {
        assert!(
            log.contains(&format!("phase=\"{phase}\"")),
            "no phase {phase}:\n{log}"
        );
    }

    let held: Vec<(String, String, Option<String>)> = setup
        .db
        .rows("SELECT name, status, lease_owner FROM tasks ORDER BY name")
        .await;
    assert_eq!(
        held,
        vec![
            ("one".to_owned(), "pending".to_owned(), None),
            ("two".to_owned(), "pending".to_owned(), None),
        ],
        "every lease is handed back:\n{log}"
    );
    let released = setup
        .db
        .scalar("SELECT count(*) FROM events WHERE event_type = 'task.released'")
        .await;
    assert_eq!(released, 2, "one task.released each:\n{log}");

    let pushed = setup
        .remote_status()
        .unwrap_or_else(|| panic!("the status was pushed on the way out:\n{log}"));
    for task in ["one", "two"] {
        assert_eq!(
            pushed["tasks"][task]["phase"], "pending",
            "{task} in the pushed status: {pushed}"
        );
    }
}

#[tokio::test]
async fn a_second_sigterm_stops_at_once() {
    let setup = Setup::new().await;
    let mut controller = setup.start("60s");
    setup.both_running(&mut controller).await;

    sigterm(&controller);
    let log = controller.log.clone();
    eventually("the stop began", Duration::from_secs(10), || {
        let log = log.clone();
        async move {
            common::log_tail(&log, 40)
                .contains("hand back")
                .then_some(())
        }
    })
    .await;
    let signalled = Instant::now();
    sigterm(&controller);
    let status = wait_exit(&mut controller, Duration::from_secs(5)).await;
    let took = signalled.elapsed();
    let log = controller.log_tail(40);
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "exit status {status:?}:\n{log}"
    );
    assert!(took < Duration::from_secs(2), "took {took:?}:\n{log}");
    assert!(log.contains("second signal"), "{log}");
}

/// The value of the series `name` (with its labels, as `/metrics` prints them).
fn series(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

#[tokio::test]
async fn metrics_count_syncs_invalid_files_and_status_commits() {
    // A valid task but for one unknown field.
    let bad = sleeping_task("bad").replace("  retries: 2\n", "  retries: 2\n  colour: red\n");
    let setup = Setup::with_files(&[("projects/p/tasks/bad.yaml", &bad)]).await;
    let mut controller = setup.start_with(&[
        "--no-agents",
        "--status-interval",
        "200ms",
        "--poll-interval",
        "200ms",
    ]);
    let http = reqwest::Client::new();
    let url = format!("http://{}/metrics", setup.addr);
    let scrape = || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let answer = http.get(&url).send().await.ok()?;
            answer.text().await.ok()
        }
    };
    let first = eventually("the status is pushed", Duration::from_secs(60), || {
        let scrape = scrape();
        async move {
            let metrics = scrape.await?;
            // The status writer runs beside the sync loop, so its push can be counted a
            // moment before the sync that fed it is.
            let pushed = series(
                &metrics,
                "agentops_writeback_commits_total{kind=\"status\"}",
            )? >= 1.0;
            let synced = series(&metrics, "agentops_syncs_total")? >= 1.0;
            (pushed && synced).then_some(metrics)
        }
    })
    .await;
    assert!(controller.is_running(), "{}", controller.log_tail(40));
    // Polls that find nothing new count as syncs too, and one may have run already.
    let syncs = series(&first, "agentops_syncs_total").unwrap();
    assert!(syncs >= 1.0, "{first}");
    assert_eq!(
        series(&first, "agentops_sync_duration_seconds_count"),
        Some(syncs),
        "{first}"
    );
    // project.yaml, one.yaml, two.yaml and bad.yaml.
    assert_eq!(
        series(&first, "agentops_sync_files_parsed_total"),
        Some(4.0),
        "{first}"
    );
    assert_eq!(
        series(&first, "agentops_sync_invalid"),
        Some(1.0),
        "{first}"
    );
    assert_eq!(
        series(&first, "agentops_writeback_commits_total{kind=\"status\"}"),
        Some(1.0),
        "one status commit: nothing changed after it\n{first}"
    );
    // Counted once committed; the push follows.
    eventually(
        "the status commit is on the remote",
        Duration::from_secs(30),
        || {
            let pushed = setup.remote_status().map(|_| ());
            async move { pushed }
        },
    )
    .await;
    assert_eq!(
        series(&first, "agentops_sync_errors_total{reason=\"fetch\"}"),
        None
    );

    // A person fixes the broken file: one more sync, one file read, no problem left, and the
    // status changes again.
    let work = setup.dir.path().join("fix");
    git(
        setup.dir.path(),
        &["clone", "-q", setup.remote.to_str().unwrap(), "fix"],
    );
    std::fs::write(work.join("projects/p/tasks/bad.yaml"), sleeping_task("bad")).unwrap();
    git(&work, &["commit", "-qam", "fix bad"]);
    git(&work, &["push", "-q", "origin", "main"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let second = loop {
        let metrics = scrape().await.unwrap_or_default();
        if series(
            &metrics,
            "agentops_writeback_commits_total{kind=\"status\"}",
        ) >= Some(2.0)
            && series(&metrics, "agentops_sync_files_parsed_total") >= Some(5.0)
        {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "the fix was not synced and its status pushed:\n{metrics}\n{}",
            controller.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        series(&second, "agentops_syncs_total").unwrap() >= 2.0,
        "{second}"
    );
    assert_eq!(
        series(&second, "agentops_sync_files_parsed_total"),
        Some(5.0),
        "{second}"
    );
    assert_eq!(
        series(&second, "agentops_sync_invalid"),
        Some(0.0),
        "{second}"
    );
    controller.kill();
}

#[tokio::test]
async fn a_store_failure_answers_500_with_an_error_id_and_logs_the_cause() {
    let setup = Setup::new().await;
    let mut controller = setup.start_with(&["--no-agents"]);
    let http = reqwest::Client::new();
    let base = format!("http://{}", setup.addr);
    let registered = eventually("the agent registers", Duration::from_secs(60), || {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let answer = http
                .post(format!("{base}/api/v1/agents/register"))
                .json(&serde_json::json!({"name": "probe", "type": "seed"}))
                .send()
                .await
                .ok()?;
            answer.json::<serde_json::Value>().await.ok()
        }
    })
    .await;
    let token = registered["token"].as_str().expect("a token").to_owned();
    let db = &setup.db;
    eventually("the tasks are synced", Duration::from_secs(60), || async {
        (db.scalar("SELECT count(*) FROM tasks").await == 2).then_some(())
    })
    .await;
    // The store breaks under the controller: the table progress reports write to is gone.
    setup
        .db
        .execute("ALTER TABLE task_updates RENAME TO task_updates_gone")
        .await;
    let id = setup
        .db
        .text("SELECT id::text FROM tasks LIMIT 1")
        .await
        .unwrap();
    let answer = http
        .post(format!("{base}/api/v1/tasks/{id}/progress"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"run_lease": 1, "message": "half way"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 500);
    let body: serde_json::Value = answer.json().await.unwrap();
    let message = body["error"].as_str().unwrap_or_default().to_owned();
    let error_id = message
        .split("error id ")
        .nth(1)
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no error id in {body}"))
        .to_owned();
    assert!(
        !message.contains("task_updates") && !message.contains("database"),
        "the cause stays in the log: {message}"
    );
    let log = eventually("the cause is logged", Duration::from_secs(10), || {
        let log = controller.log.clone();
        let error_id = error_id.clone();
        async move {
            let tail = common::log_tail(&log, 40);
            tail.lines()
                .any(|l| l.contains(&error_id) && l.contains("database error"))
                .then_some(tail)
        }
    })
    .await;
    assert!(log.contains("reason=\"store_query\""), "{log}");
    controller.kill();
}

/// Two controllers on one database: the second stands by (alive, not ready, leasing nothing)
/// while the first leads, and takes over once the first is killed.
#[tokio::test]
async fn a_second_controller_stands_by_and_takes_over_when_the_leader_dies() {
    let setup = Setup::new().await;
    let args = [
        "--status-interval",
        "1h",
        "--lease",
        "3s",
        "--leader-retry",
        "1s",
    ];
    let mut leader = setup.start_with(&args);
    setup.both_running(&mut leader).await;
    let leases_before: Vec<(String, Option<String>, i64)> = setup
        .db
        .rows("SELECT name, lease_owner, run_lease FROM tasks ORDER BY name")
        .await;

    let standby_addr = format!("127.0.0.1:{}", free_port());
    let mut standby = setup.start_as("standby", &standby_addr, &args);
    let log = standby.log.clone();
    eventually(
        "the second controller stands by",
        Duration::from_secs(30),
        || {
            let log = log.clone();
            async move {
                common::log_tail(&log, 40)
                    .contains("standing by")
                    .then_some(())
            }
        },
    )
    .await;
    let http = reqwest::Client::new();
    let get = |path: &str| {
        let (http, url) = (http.clone(), format!("http://{standby_addr}{path}"));
        async move {
            let answer = http.get(&url).send().await.expect("the standby answers");
            (answer.status().as_u16(), answer.text().await.unwrap())
        }
    };
    assert_eq!(get("/healthz").await.0, 200);
    let (ready, why) = get("/readyz").await;
    assert_eq!(ready, 503, "{why}");
    let (_, metrics) = get("/metrics").await;
    assert!(metrics.contains("agentops_leader 0"), "{metrics}");
    let (claimed, _) = get("/api/v1/claim").await;
    assert_eq!(claimed, 503, "the standby takes no agent requests");
    // Several lock retries later, it still has not led: nothing moved.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(standby.is_running(), "{}", standby.log_tail(40));
    let standby_log = standby.log_tail(200);
    assert!(!standby_log.contains("listening on"), "{standby_log}");
    assert!(!standby_log.contains("synced"), "{standby_log}");
    let leases_now: Vec<(String, Option<String>, i64)> = setup
        .db
        .rows("SELECT name, lease_owner, run_lease FROM tasks ORDER BY name")
        .await;
    assert_eq!(leases_now, leases_before, "only the leader leases");

    leader.kill();
    let killed = Instant::now();
    let log = standby.log.clone();
    eventually("the standby leads", Duration::from_secs(15), || {
        let log = log.clone();
        async move {
            common::log_tail(&log, 200)
                .contains("leading")
                .then_some(())
        }
    })
    .await;
    let took_over = killed.elapsed();
    assert!(
        took_over <= Duration::from_secs(15),
        "took over after {took_over:?}"
    );
    eventually("the new leader is ready", Duration::from_secs(30), || {
        let get = get("/readyz");
        async move { (get.await.0 == 200).then_some(()) }
    })
    .await;
    // The dead leader's leases run out and its tasks run again under the new leader.
    eventually("the tasks run again", Duration::from_secs(60), || {
        let db = &setup.db;
        async move {
            let rerun = db
                .scalar(
                    "SELECT count(*) FROM tasks WHERE status = 'in_progress' AND run_lease >= 2",
                )
                .await;
            (rerun == 2).then_some(())
        }
    })
    .await;
    let (_, metrics) = get("/metrics").await;
    assert!(metrics.contains("agentops_leader 1"), "{metrics}");
    sigterm(&standby);
    let status = wait_exit(&mut standby, Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{}", standby.log_tail(40));
}

/// A non-loopback address of this machine, to reach the controller as another host would.
fn outside_address() -> String {
    let out = Command::new("hostname")
        .arg("-I")
        .output()
        .expect("hostname runs");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|a| {
            a.parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| !ip.is_loopback())
        })
        .expect("this machine has a non-loopback IPv4 address")
        .to_owned()
}

/// The agents registered besides the two the schema seeds.
async fn agents(db: &TestDb) -> Vec<String> {
    db.rows::<(String,)>("SELECT name FROM agents WHERE name NOT IN ('cos', 'seed') ORDER BY name")
        .await
        .into_iter()
        .map(|(n,)| n)
        .collect()
}

async fn register(
    http: &reqwest::Client,
    url: &str,
    name: &str,
    agent_type: &str,
    secret: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut request = http
        .post(format!("{url}/api/v1/agents/register"))
        .json(&serde_json::json!({"name": name, "type": agent_type}));
    if let Some(secret) = secret {
        request = request.bearer_auth(secret);
    }
    let answer = request.send().await.expect("the controller answers");
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or_default())
}

/// Without a secret only this machine registers; with one, everyone must present it, and a
/// per-agent secret admits its name and types only. Nothing refused reaches the store, and
/// every refusal is counted.
#[tokio::test]
async fn registration_needs_this_machine_or_the_enrollment_secret() {
    let setup = Setup::new().await;
    let port = free_port();
    let listen = format!("0.0.0.0:{port}");
    let (local, outside) = (
        format!("http://127.0.0.1:{port}"),
        format!("http://{}:{port}", outside_address()),
    );
    let http = reqwest::Client::new();
    let ready = |url: String| {
        let http = http.clone();
        async move {
            eventually("the API is ready", Duration::from_secs(60), || {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    let answer = http.get(format!("{url}/readyz")).send().await.ok()?;
                    answer.status().is_success().then_some(())
                }
            })
            .await
        }
    };

    let mut open = setup.start_as("open", &listen, &["--no-agents"]);
    ready(local.clone()).await;
    let log = open.log_tail(40);
    assert!(
        log.contains("agent registration: from this machine only"),
        "{log}"
    );
    let (status, body) = register(&http, &outside, "far", "seed", None).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (403, Some("not_loopback")),
        "{body}"
    );
    let (status, body) = register(&http, &local, "near", "seed", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(agents(&setup.db).await, ["near"]);
    sigterm(&open);
    wait_exit(&mut open, Duration::from_secs(30)).await;

    let secrets = setup.dir.path().join("agent-secrets.yaml");
    let laptop_hash = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b"laptop-secret"))
    };
    std::fs::write(
        &secrets,
        format!("agents:\n  - name: laptop\n    secretSha256: {laptop_hash}\n    types: [seed]\n"),
    )
    .unwrap();
    let mut guarded = setup.start_as(
        "guarded",
        &listen,
        &[
            "--no-agents",
            "--agent-secret",
            "team-secret",
            "--agent-secrets",
            secrets.to_str().unwrap(),
        ],
    );
    ready(local.clone()).await;
    for (url, name, agent_type, secret, expected, reason) in [
        (&local, "no-secret", "seed", None, 401, "no_secret"),
        (
            &outside,
            "wrong",
            "seed",
            Some("guess"),
            401,
            "wrong_secret",
        ),
        (
            &outside,
            "laptop",
            "cos",
            Some("laptop-secret"),
            403,
            "type_not_allowed",
        ),
        (
            &outside,
            "other",
            "seed",
            Some("laptop-secret"),
            401,
            "wrong_secret",
        ),
    ] {
        let (status, body) = register(&http, url, name, agent_type, secret).await;
        assert_eq!(
            (status, body["reason"].as_str()),
            (expected, Some(reason)),
            "{name}: {body}"
        );
    }
    let (status, body) = register(&http, &outside, "laptop", "seed", Some("laptop-secret")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) =
        register(&http, &outside, "remote", "specialist", Some("team-secret")).await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().unwrap().to_owned();
    assert_eq!(
        agents(&setup.db).await,
        ["laptop", "near", "remote"],
        "nothing refused was stored"
    );
    // The registered agent works with its session token, not the enrollment secret.
    let claim = |bearer: String| {
        let http = http.clone();
        let url = format!("{outside}/api/v1/claim");
        async move {
            http.post(url)
                .bearer_auth(bearer)
                .json(&serde_json::json!({"max": 1, "wait_ms": 0}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(claim(token).await, 200);
    assert_eq!(claim("team-secret".into()).await, 401);

    let metrics = http
        .get(format!("{local}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (reason, count) in [
        ("no_secret", 1.0),
        ("wrong_secret", 2.0),
        ("type_not_allowed", 1.0),
    ] {
        assert_eq!(
            series(
                &metrics,
                &format!("agentops_registrations_refused_total{{reason=\"{reason}\"}}")
            ),
            Some(count),
            "{metrics}"
        );
    }
    // The agent binary presents the secret from its environment.
    let mut runner = Command::new(common::agent_run_bin());
    runner
        .args(["--api", &outside, "--name", "runner-x"])
        .env("AGENTOPS_AGENT_SECRET", "team-secret");
    let _runner = Proc::spawn("runner", runner, &setup.dir.path().join("runner.log"));
    eventually("the runner registers", Duration::from_secs(30), || {
        let db = &setup.db;
        async move {
            agents(db)
                .await
                .contains(&"runner-x".to_owned())
                .then_some(())
        }
    })
    .await;
    sigterm(&guarded);
    wait_exit(&mut guarded, Duration::from_secs(30)).await;
}
