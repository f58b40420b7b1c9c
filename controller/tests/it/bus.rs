//! The bus (NATS JetStream) and presence (Redis) against real servers. Every test starts its
//! own `nats-server -js` and `redis-server` on free ports, in temporary directories, so it can
//! kill and restart them without disturbing anything else; they are killed when the test ends,
//! passing or not. Postgres is the shared test server (scratch databases, see `common`).

use crate::common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentops::api::ApiState;
use agentops::bus::{Bus, BusError, BusNames, NatsBus};
use agentops::bus::{BusMessage, InProcessBus};
use agentops::dispatch::{Backends, Background, DispatchConfig, Dispatcher};
use agentops::presence::{MemoryPresence, Presence, RedisPresence};
use agentops::store::PgStore;
use agentops::store::queue::{
    AgentIdentity, Completion, Lease, Liveness, Outbox, Queue, ReadyTask, StoredEvent,
};
use agentops_agents::runtime::{Agent, AgentConfig, Assignment, Outcome, TaskContext};
use async_nats::jetstream;
use common::*;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The streams' names under the default prefix, as agents and `agents/PROTOCOL.md` know them.
const EVENTS_STREAM: &str = "AGENTOPS_EVENTS";
const DISPATCH_STREAM: &str = "AGENTOPS_DISPATCH";

// ---------------------------------------------------------------------------------------------
// Private servers
// ---------------------------------------------------------------------------------------------

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `name` on the PATH, else in the places Debian installs it.
fn binary(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found (scripts/test.sh installs it)"))
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// A server process of our own; killed on drop.
struct Server {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Server {
    /// `nats-server -js`, its JetStream store in a directory that outlives restarts.
    fn nats() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let store = dir.path().join("jetstream").display().to_string();
        let args = [
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-js",
            "-sd",
            &store,
        ]
        .map(String::from)
        .to_vec();
        Server::started("nats-server", args, port, dir)
    }

    /// `redis-server` without persistence: a restart starts empty.
    fn redis() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let work = dir.path().display().to_string();
        let args = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &work,
        ]
        .map(String::from)
        .to_vec();
        Server::started("redis-server", args, port, dir)
    }

    fn started(name: &'static str, args: Vec<String>, port: u16, dir: tempfile::TempDir) -> Server {
        let mut server = Server {
            name,
            program: binary(name),
            args,
            port,
            dir,
            child: None,
        };
        server.start();
        server
    }

    fn start(&mut self) {
        assert!(self.child.is_none(), "{} is running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.program.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !port_open(self.port) {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.path().join("server.log"));
                panic!("{} did not listen on {}: {log:?}", self.name, self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the server gets no chance to say goodbye to its clients.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        match self.name {
            "nats-server" => format!("nats://127.0.0.1:{}", self.port),
            _ => format!("redis://127.0.0.1:{}/", self.port),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// A controller in this process, agents, the real binary
// ---------------------------------------------------------------------------------------------

fn config(heartbeat: Duration) -> DispatchConfig {
    let mut config = DispatchConfig {
        heartbeat,
        sweep: Duration::from_millis(200),
        ..DispatchConfig::default()
    };
    config.policy.lease = Duration::from_secs(5);
    config
}

/// The dispatcher, its HTTP API and its background loops, on a store of `db`.
struct Controller {
    dispatcher: Arc<Dispatcher<PgStore>>,
    api: String,
    server: tokio::task::JoinHandle<()>,
    _loops: Background,
    _background: Background,
}

impl Controller {
    async fn start(db: &TestDb, backends: Backends, config: DispatchConfig) -> Controller {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Controller::on(listener, db, backends, config).await
    }

    async fn on(
        listener: tokio::net::TcpListener,
        db: &TestDb,
        backends: Backends,
        config: DispatchConfig,
    ) -> Controller {
        let store = PgStore::open(&db.url).await;
        let dispatcher = Dispatcher::with_backends(store, config, backends);
        let api = format!("http://{}", listener.local_addr().unwrap());
        let state = ApiState::new(dispatcher.clone());
        let server = tokio::spawn(async move {
            agentops::api::serve(
                listener,
                agentops::api::router(state),
                std::future::pending(),
            )
            .await
            .unwrap();
        });
        let loops = dispatcher.start();
        let background = dispatcher.spawn_background();
        // As `up` does after a sync that wrote objects.
        dispatcher.events_recorded();
        dispatcher.wake();
        Controller {
            dispatcher,
            api,
            server,
            _loops: loops,
            _background: background,
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Agents on the runtime whose handler waits `work`, then completes the task.
struct Agents {
    stop: CancellationToken,
    runs: Vec<tokio::task::JoinHandle<()>>,
}

impl Agents {
    fn start(
        api: &str,
        nats: Option<&str>,
        names: &[&str],
        concurrency: usize,
        work: Duration,
    ) -> Agents {
        let stop = CancellationToken::new();
        let runs = names
            .iter()
            .map(|name| {
                let config = AgentConfig {
                    concurrency,
                    claim_wait: Duration::from_secs(5),
                    nats: nats.map(str::to_owned),
                    ..AgentConfig::new(api, *name)
                };
                let handler = move |task: Assignment, _ctx: TaskContext| async move {
                    tokio::time::sleep(work).await;
                    Outcome::complete(json!({"summary": format!("did {}", task.name)}))
                };
                let stop = stop.clone();
                tokio::spawn(async move {
                    Agent::new(config, handler).run(stop).await.expect("agent");
                })
            })
            .collect();
        Agents { stop, runs }
    }

    async fn stop(self) {
        self.stop.cancel();
        for run in self.runs {
            run.await.unwrap();
        }
    }
}

/// The `agentops` binary, killed on drop.
struct Binary {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Binary {
    fn up(db: &TestDb, repo: &Path, data: &Path, extra: &[&str]) -> Binary {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut command = Command::new(env!("CARGO_BIN_EXE_agentops"));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("AGENTOPS_") {
                command.env_remove(key);
            }
        }
        let log_path = data.join("up.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = command
            .env("AGENTOPS_DATA_DIR", data)
            .env("AGENTOPS_LOG", "info")
            .args([
                "up",
                "--repo",
                repo.to_str().unwrap(),
                "--database",
                &db.url,
            ])
            .args(["--listen", &addr, "--heartbeat", "1s", "--lease", "5s"])
            // These tests play the agents themselves.
            .arg("--no-agents")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start agentops up");
        Binary {
            child,
            addr,
            log: log_path,
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        common::log_tail(&self.log, lines)
    }

    async fn wait_ready(&self) {
        eventually(
            Duration::from_secs(20),
            "the controller is ready",
            || async {
                http_get(&self.addr, "/readyz")
                    .await
                    .map(|(status, _)| status)
                    == Some(200)
            },
        )
        .await;
    }

    /// The sum of every sample of a `/metrics` counter.
    async fn metric(&self, name: &str) -> f64 {
        let (status, body) = http_get(&self.addr, "/metrics")
            .await
            .expect("GET /metrics");
        assert_eq!(status, 200);
        body.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A GET over a fresh connection: `(status, body)`, or `None` if nothing answered.
async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// Polls `check` until it holds, failing the test after `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A repository with project `load` and `tasks` tasks for the `seed` pool.
async fn load_env(tasks: usize) -> Env<PgStore> {
    let mut env = Env::<PgStore>::new().await;
    let files: Vec<(String, String)> = std::iter::once((
        "projects/load/project.yaml".to_owned(),
        project("load", "Load"),
    ))
    .chain((0..tasks).map(|i| {
        (
            format!("projects/load/tasks/t{i:04}.yaml"),
            task(&format!("t{i:04}"), "A task"),
        )
    }))
    .collect();
    let changes: Vec<(&str, Option<&str>)> = files
        .iter()
        .map(|(p, c)| (p.as_str(), Some(c.as_str())))
        .collect();
    env.commit("load", &changes);
    env.sync().await;
    env
}

async fn completed(db: &TestDb) -> i64 {
    db.scalar("SELECT count(*) FROM tasks WHERE status = 'completed'")
        .await
}

/// Every task completed, each by exactly one `task.completed` event.
async fn assert_each_completed_once(db: &TestDb, tasks: usize) {
    let tasks = tasks as i64;
    assert_eq!(completed(db).await, tasks, "tasks completed");
    let events = db
        .scalar("SELECT count(*) FROM events WHERE event_type = 'task.completed'")
        .await;
    let distinct = db
        .scalar(
            "SELECT count(DISTINCT payload ->> 'id') FROM events \
             WHERE event_type = 'task.completed'",
        )
        .await;
    assert_eq!((events, distinct), (tasks, tasks), "completion events");
}

async fn jetstream_of(url: &str) -> jetstream::Context {
    jetstream::new(async_nats::connect(url).await.expect("connect to NATS"))
}

/// Every event now in `stream` whose subject starts with `prefix`, read through an ephemeral
/// consumer: `(subject, event)`, taken out of the messages' arrays in order.
async fn read_stream(js: &jetstream::Context, stream: &str, prefix: &str) -> Vec<(String, Value)> {
    let mut stream = js.get_stream(stream).await.unwrap();
    let total = stream.info().await.unwrap().state.messages as usize;
    let consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap().take(total);
    let mut out = Vec::with_capacity(total);
    while let Some(message) = tokio::time::timeout(Duration::from_secs(5), messages.next())
        .await
        .expect("the stream's messages come")
    {
        let message = message.unwrap();
        if message.subject.starts_with(prefix) {
            let subject = message.subject.to_string();
            out.extend(events_in(&message.payload).map(|event| (subject.clone(), event)));
        }
    }
    out
}

/// The events one message carries: its body is a JSON array of them.
fn events_in(body: &[u8]) -> impl Iterator<Item = Value> + use<> {
    let events: Vec<Value> = serde_json::from_slice(body).expect("a JSON array of events");
    assert!(!events.is_empty(), "a message without events");
    events.into_iter()
}

/// The events in the events stream, each once: fails on an event id seen twice.
async fn stream_events(js: &jetstream::Context) -> usize {
    let events = read_stream(js, EVENTS_STREAM, "").await;
    let mut ids = HashSet::new();
    for (_, event) in &events {
        let id = event["id"].as_str().unwrap().to_owned();
        assert!(ids.insert(id), "event {event} twice in the stream");
    }
    events.len()
}

async fn stream_messages(js: &jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

async fn unpublished(db: &TestDb) -> i64 {
    db.scalar("SELECT count(*) FROM event_outbox").await
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

/// A claim and a completion through the dispatcher: every `events` row (the sync's, the
/// claim's, the completion's) is on `agentops.events.<type>` once, with the row's payload;
/// published again (a relay that stopped between publishing and marking), JetStream drops
/// them as duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_a_claim_and_a_completion_are_on_nats() {
    let nats = Server::nats();
    let env = load_env(2).await;
    let js = jetstream_of(&nats.url()).await;
    let mut live = js
        .client()
        .subscribe("agentops.events.>")
        .await
        .expect("subscribe");
    let bus = Arc::new(
        NatsBus::connect(&nats.url(), BusNames::default())
            .await
            .unwrap(),
    );
    let backends = Backends {
        bus,
        presence: Arc::new(MemoryPresence::default()),
    };
    let controller = Controller::start(&env.db, backends, config(Duration::from_secs(1))).await;
    let d = &controller.dispatcher;

    let worker = AgentIdentity {
        name: "worker".to_owned(),
        agent_type: "seed".to_owned(),
        capabilities: Vec::new(),
        concurrency: 1,
    };
    d.register(worker.clone()).await.unwrap();
    let claimed = d.claim(&worker, 1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let task = &claimed[0];
    let completion = Completion {
        lease: Lease {
            id: task.id,
            run_lease: task.run_lease,
        },
        result: json!({"summary": "done"}),
        artifacts: Vec::new(),
        review: false,
    };
    assert_eq!(d.complete(&worker, &[completion]).await.unwrap(), [Ok(())]);

    // Every row, as the store has it.
    let db = &env.db;
    eventually(
        Duration::from_secs(10),
        "every event is published",
        || async {
            unpublished(db).await == 0
                && db
                    .scalar("SELECT count(*) FROM events WHERE event_type = 'task.completed'")
                    .await
                    == 1
        },
    )
    .await;
    let rows: Vec<(String, String, String)> = db
        .rows(
            "SELECT CAST(id AS text), event_type, CAST(payload AS text) FROM events \
             ORDER BY created_at",
        )
        .await;
    let types: BTreeMap<&str, usize> = rows.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.1.as_str()).or_default() += 1;
        m
    });
    assert_eq!(
        types,
        BTreeMap::from([
            ("project.created", 1),
            ("task.claimed", 1),
            ("task.completed", 1),
            ("task.created", 2)
        ])
    );

    // What a subscriber saw, by event id.
    let mut seen: HashMap<String, (String, Value)> = HashMap::new();
    while seen.len() < rows.len() {
        let message = tokio::time::timeout(Duration::from_secs(5), live.next())
            .await
            .expect("a message for every event")
            .unwrap();
        for body in events_in(&message.payload) {
            let id = body["id"].as_str().unwrap().to_owned();
            assert!(
                seen.insert(id, (message.subject.to_string(), body))
                    .is_none(),
                "an event delivered twice"
            );
        }
    }
    for (id, event_type, payload) in &rows {
        let (subject, body) = &seen[id];
        assert_eq!(subject, &format!("agentops.events.{event_type}"));
        assert_eq!(body["type"], json!(event_type));
        assert_eq!(
            body["payload"],
            serde_json::from_str::<Value>(payload).unwrap()
        );
    }
    let completed = rows.iter().find(|r| r.1 == "task.completed").unwrap();
    let completed = &seen[&completed.0].1;
    assert_eq!(completed["source_agent"], "worker");
    assert_eq!(completed["payload"]["id"], json!(task.id));
    assert_eq!(completed["payload"]["run_lease"], json!(task.run_lease));
    assert_eq!(completed["payload"]["agent"], "worker");
    assert_eq!(stream_events(&js).await, rows.len());

    // Published again: the stream keeps one of each.
    // The claim's and the completion's events went out one per message; queued again in that
    // order, they make the same messages, with the same ids. (The sync's three events are
    // left out: they share a `created_at`, so SQL cannot give their original order back.)
    let published = d.metrics.bus_published_total("events");
    db.execute(
        "INSERT INTO event_outbox (event_ids) SELECT ARRAY[id] FROM events \
         WHERE event_type IN ('task.claimed', 'task.completed') ORDER BY created_at",
    )
    .await;
    d.events_recorded();
    eventually(
        Duration::from_secs(10),
        "the events are published again",
        || async { unpublished(db).await == 0 },
    )
    .await;
    assert_eq!(d.metrics.bus_published_total("events"), published + 2);
    assert_eq!(stream_events(&js).await, rows.len());
    assert_eq!(d.metrics.bus_failures_total(), 0);

    // The stream is lost (deleted by hand, a server that lost its store): publishing fails
    // until the relay has made the stream again, and the events of that moment wait for it.
    js.delete_stream(EVENTS_STREAM).await.unwrap();
    let claimed = d.claim(&worker, 1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(claimed.len(), 1);
    eventually(
        Duration::from_secs(10),
        "the claim is published",
        || async { unpublished(db).await == 0 },
    )
    .await;
    assert!(
        d.metrics.bus_failures_total() > 0,
        "the lost stream was noticed"
    );
    let republished = read_stream(&js, EVENTS_STREAM, "agentops.events.").await;
    assert_eq!(republished.len(), 1, "{republished:?}");
    let (subject, body) = &republished[0];
    assert_eq!(subject, "agentops.events.task.claimed");
    assert_eq!(body["payload"]["id"], json!(claimed[0].id));
}

// ---------------------------------------------------------------------------------------------
// Announcements
// ---------------------------------------------------------------------------------------------

/// Ready task number `task` of the `seed` pool, at its first lease.
fn seed_task(task: u128) -> ReadyTask {
    ReadyTask {
        pool: "seed".to_owned(),
        task: Uuid::from_u128(task),
        run_lease: 1,
    }
}

/// Two installations on one NATS server, the default one and one with `--bus-prefix staging`:
/// each announcement lands in its own installation's stream only, and deleting the streams of
/// one (what `bench dispatch` does with its own) leaves the other's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installations_with_different_prefixes_share_a_server_apart() {
    let nats = Server::nats();
    let js = jetstream_of(&nats.url()).await;
    let default = NatsBus::connect(&nats.url(), BusNames::default())
        .await
        .unwrap();
    let staging = NatsBus::connect(&nats.url(), BusNames::new("staging").unwrap())
        .await
        .unwrap();
    default.announce(&[seed_task(1)]).await.unwrap();
    staging
        .announce(&[seed_task(2), seed_task(3)])
        .await
        .unwrap();

    assert_eq!(stream_messages(&js, DISPATCH_STREAM).await, 1);
    assert_eq!(stream_messages(&js, "STAGING_DISPATCH").await, 2);
    let last_task = |stream: &'static str, subject: &'static str| {
        let js = js.clone();
        async move {
            let stored = js
                .get_stream(stream)
                .await
                .unwrap()
                .get_last_raw_message_by_subject(subject)
                .await
                .unwrap();
            serde_json::from_slice::<Value>(&stored.payload).unwrap()["task"].clone()
        }
    };
    assert_eq!(
        last_task(DISPATCH_STREAM, "agentops.dispatch.seed").await,
        json!(Uuid::from_u128(1))
    );
    assert_eq!(
        last_task("STAGING_DISPATCH", "staging.dispatch.seed").await,
        json!(Uuid::from_u128(3))
    );

    staging.delete_streams().await.unwrap();
    assert!(js.get_stream("STAGING_DISPATCH").await.is_err());
    assert!(js.get_stream("STAGING_EVENTS").await.is_err());
    assert_eq!(stream_messages(&js, DISPATCH_STREAM).await, 1);
    assert!(js.get_stream(EVENTS_STREAM).await.is_ok());
}

/// A publish of many messages while the server is gone fails within a few acknowledgement
/// timeouts (2 s each): the acknowledgements are awaited together. Awaited one after another,
/// 500 of them took up to 500 timeouts, and a relay pass hung through a NATS restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_publish_fails_within_seconds_when_the_server_is_gone() {
    let mut nats = Server::nats();
    let bus = NatsBus::connect(&nats.url(), BusNames::default())
        .await
        .unwrap();
    // Connected, and the streams exist: the next publish goes straight to sending.
    bus.announce(&[seed_task(0)]).await.unwrap();
    nats.kill();

    let batch: Vec<ReadyTask> = (1..=500).map(seed_task).collect();
    let began = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(30), bus.announce(&batch))
        .await
        .expect("a publish to a server that is gone still waited after 30 s");
    let took = began.elapsed();
    assert!(result.is_err(), "published to a server that is gone");
    assert!(
        took < Duration::from_secs(8),
        "the publish took {took:?} to fail"
    );
}

/// JetStream keeps one announcement per `<task>:<run_lease>`; and announcements delivered
/// many times over make extra claims, never extra work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_announcements_are_dropped_and_repeated_deliveries_do_no_double_work() {
    const TASKS: usize = 20;
    let nats = Server::nats();
    let js = jetstream_of(&nats.url()).await;
    let bus = Arc::new(
        NatsBus::connect(&nats.url(), BusNames::default())
            .await
            .unwrap(),
    );

    let ready = |run_lease| ReadyTask {
        pool: "solo".to_owned(),
        task: Uuid::from_u128(42),
        run_lease,
    };
    bus.announce(&[ready(7), ready(7)]).await.unwrap();
    bus.announce(&[ready(7)]).await.unwrap();
    assert_eq!(stream_messages(&js, DISPATCH_STREAM).await, 1);
    let stored = js
        .get_stream(DISPATCH_STREAM)
        .await
        .unwrap()
        .get_last_raw_message_by_subject("agentops.dispatch.solo")
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&stored.payload).unwrap();
    assert_eq!(
        body,
        json!({"pool": "solo", "task": Uuid::from_u128(42), "run_lease": 7})
    );
    // Ready again after a retry: a new announcement.
    bus.announce(&[ready(8)]).await.unwrap();
    assert_eq!(stream_messages(&js, DISPATCH_STREAM).await, 2);
    js.get_stream(DISPATCH_STREAM)
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();

    // Three extra deliveries of a hint per task, under message ids JetStream cannot drop.
    let env = load_env(TASKS).await;
    for round in 0..3 {
        for i in 0..TASKS {
            let publish = jetstream::message::PublishMessage::build()
                .payload(json!({"pool": "seed", "hint": i}).to_string().into())
                .message_id(format!("extra-{round}-{i}"));
            js.send_publish("agentops.dispatch.seed", publish)
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }
    let backends = Backends {
        bus,
        presence: Arc::new(MemoryPresence::default()),
    };
    let controller = Controller::start(&env.db, backends, config(Duration::from_secs(1))).await;
    let agents = Agents::start(
        &controller.api,
        Some(&nats.url()),
        &["dup-a", "dup-b", "dup-c"],
        2,
        Duration::from_millis(20),
    );
    let db = &env.db;
    eventually(
        Duration::from_secs(20),
        "every task is completed",
        || async { completed(db).await == TASKS as i64 },
    )
    .await;
    // The agents took every hint, the 60 extra ones too, and acknowledged it.
    eventually(
        Duration::from_secs(10),
        "the hints are consumed",
        || async { stream_messages(&js, DISPATCH_STREAM).await == 0 },
    )
    .await;
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_stream(DISPATCH_STREAM)
        .await
        .unwrap()
        .get_consumer("agentops-seed")
        .await
        .unwrap();
    let delivered = consumer.info().await.unwrap().delivered.consumer_sequence;
    assert!(delivered >= 3 * TASKS as u64, "{delivered} hints delivered");
    agents.stop().await;

    assert_each_completed_once(db, TASKS).await;
    let claims = db
        .scalar(
            "SELECT count(*) FROM (SELECT payload ->> 'id' FROM events \
             WHERE event_type = 'task.claimed' GROUP BY 1 HAVING count(*) > 1) twice",
        )
        .await;
    assert_eq!(claims, 0, "a task claimed twice");
    let other = db
        .scalar(
            "SELECT count(*) FROM events \
             WHERE event_type IN ('task.released', 'task.lease_expired', 'task.failed')",
        )
        .await;
    assert_eq!(other, 0);
    let announced = controller
        .dispatcher
        .metrics
        .bus_published_total("announcements");
    assert!(announced >= 1, "the controller announced the ready tasks");
}

/// An agent waiting out a backoff while its controller is away is back the moment the
/// restarted controller announces work, not when its backoff ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announcement_ends_an_agents_backoff() {
    let nats = Server::nats();
    let bus = Arc::new(
        NatsBus::connect(&nats.url(), BusNames::default())
            .await
            .unwrap(),
    );
    // The streams outlive a controller; here the previous one made them.
    bus.ensure_streams().await.unwrap();
    let env = load_env(3).await;

    // Where the controller will listen: for now a port that hangs up on every request.
    let fake = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = fake.local_addr().unwrap();
    let attempts = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let hang_up = tokio::spawn({
        let attempts = attempts.clone();
        async move {
            loop {
                let (socket, _) = fake.accept().await.unwrap();
                attempts.lock().unwrap().push(Instant::now());
                drop(socket);
            }
        }
    });
    let agents = Agents::start(
        &format!("http://{addr}"),
        Some(&nats.url()),
        &["patient"],
        1,
        Duration::ZERO,
    );
    // The registration backoff doubles (with jitter 0.5–1) up to 5 s: after a wait of 2.5 s
    // or more, the next one is at least 2.5 s.
    eventually(
        Duration::from_secs(20),
        "the agent backs off 2.5 s",
        || async {
            let attempts = attempts.lock().unwrap();
            attempts
                .windows(2)
                .any(|w| w[1] - w[0] >= Duration::from_millis(2500))
        },
    )
    .await;
    hang_up.abort();
    let _ = hang_up.await;
    let back = Instant::now();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let backends = Backends {
        bus,
        presence: Arc::new(MemoryPresence::default()),
    };
    let _controller =
        Controller::on(listener, &env.db, backends, config(Duration::from_secs(1))).await;
    let db = &env.db;
    eventually(Duration::from_secs(10), "the agent claims", || async {
        db.scalar("SELECT count(*) FROM events WHERE event_type = 'task.claimed'")
            .await
            > 0
    })
    .await;
    let took = back.elapsed();
    assert!(
        took < Duration::from_millis(2000),
        "the agent came back after {took:?}, as if it had waited out its backoff"
    );
    eventually(Duration::from_secs(10), "all done", || async {
        completed(db).await == 3
    })
    .await;
    agents.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Outages, through the real binary
// ---------------------------------------------------------------------------------------------

const RUN_TASKS: usize = 300;
const RUNNERS: [&str; 4] = ["runner-a", "runner-b", "runner-c", "runner-d"];

/// `up` with `--nats` and `--redis`, and four agents of two slots doing 100 ms tasks:
/// about 80 tasks a second.
async fn outage_run(
    nats: &Server,
    redis: &Server,
) -> (Env<PgStore>, tempfile::TempDir, Binary, Agents) {
    let env = load_env(RUN_TASKS).await;
    let data = tempfile::tempdir().unwrap();
    let up = Binary::up(
        &env.db,
        env.repo.path(),
        data.path(),
        &["--nats", &nats.url(), "--redis", &redis.url()],
    );
    up.wait_ready().await;
    let agents = Agents::start(
        &format!("http://{}", up.addr),
        Some(&nats.url()),
        &RUNNERS,
        2,
        Duration::from_millis(100),
    );
    (env, data, up, agents)
}

/// NATS killed in the middle of a run and restarted three seconds later: every task is done
/// once, and every event of the run, those of the outage too, is on the events stream once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_survives_nats_going_away_and_coming_back() {
    let mut nats = Server::nats();
    let redis = Server::redis();
    let (env, _data, up, agents) = outage_run(&nats, &redis).await;
    let db = &env.db;
    eventually(
        Duration::from_secs(20),
        "a quarter of the run is done",
        || async { completed(db).await >= (RUN_TASKS / 4) as i64 },
    )
    .await;
    nats.kill();
    let at_kill = completed(db).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let at_restart = completed(db).await;
    nats.start();
    assert!(
        at_restart - at_kill >= 50,
        "dispatch went on without NATS: {at_kill} then {at_restart} completed"
    );
    eventually(Duration::from_secs(30), "the run is done", || async {
        completed(db).await == RUN_TASKS as i64
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while unpublished(db).await > 0 {
        assert!(
            Instant::now() < deadline,
            "{} events still unpublished 30 s after the run; the controller's log:\n{}",
            unpublished(db).await,
            up.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        up.metric("agentops_bus_publish_failures_total").await > 0.0,
        "the outage was noticed"
    );
    assert!(
        up.metric("agentops_bus_publish_errors_total{reason=").await > 0.0,
        "the failed publishes were counted by reason"
    );
    assert!(
        up.metric("agentops_bus_reconnects_total").await >= 1.0,
        "the reconnect was counted"
    );
    agents.stop().await;
    assert_each_completed_once(db, RUN_TASKS).await;

    let js = jetstream_of(&nats.url()).await;
    let events = db.scalar("SELECT count(*) FROM events").await;
    assert_eq!(stream_events(&js).await, events as usize);
    let completions = read_stream(&js, EVENTS_STREAM, "agentops.events.task.completed").await;
    let mut per_task: HashMap<String, usize> = HashMap::new();
    for (_, body) in &completions {
        *per_task
            .entry(body["payload"]["id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(per_task.len(), RUN_TASKS);
    assert!(per_task.values().all(|n| *n == 1));
}

/// Redis killed in the middle of a run: dispatch goes on, no agent is taken for gone, and
/// presence is back once Redis is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_survives_redis_going_away() {
    let nats = Server::nats();
    let mut redis = Server::redis();
    let (env, _data, up, agents) = outage_run(&nats, &redis).await;
    let db = &env.db;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut ttl = -2;
    for _ in 0..100 {
        ttl = redis::cmd("PTTL")
            .arg("agentops:agent:runner-a")
            .query_async(&mut conn)
            .await
            .unwrap();
        if ttl > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Three heartbeats of 1 s.
    assert!(
        (1..=3000).contains(&ttl),
        "presence of runner-a expires in {ttl} ms"
    );

    eventually(
        Duration::from_secs(20),
        "a quarter of the run is done",
        || async { completed(db).await >= (RUN_TASKS / 4) as i64 },
    )
    .await;
    redis.kill();
    let at_kill = completed(db).await;
    // Longer than presence lives (3 s): a liveness pass that believed missing presence would
    // take every agent for gone.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let at_restart = completed(db).await;
    assert!(
        at_restart - at_kill >= 50,
        "dispatch went on without Redis: {at_kill} then {at_restart} completed"
    );
    assert!(up.metric("agentops_presence_failures_total").await > 0.0);
    assert!(up.metric("agentops_presence_errors_total{reason=").await > 0.0);
    redis.start();
    eventually(Duration::from_secs(30), "the run is done", || async {
        completed(db).await == RUN_TASKS as i64
    })
    .await;
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut present = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while present.len() < RUNNERS.len() && Instant::now() < deadline {
        present.clear();
        for runner in RUNNERS {
            let exists: bool = redis::cmd("EXISTS")
                .arg(format!("agentops:agent:{runner}"))
                .query_async(&mut conn)
                .await
                .unwrap();
            if exists {
                present.push(runner);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(present, RUNNERS, "presence is back with Redis");
    let offline = db
        .scalar("SELECT count(*) FROM events WHERE event_type = 'agent.offline'")
        .await;
    assert_eq!(offline, 0, "an agent was taken for gone");
    agents.stop().await;
    assert_each_completed_once(db, RUN_TASKS).await;

    // What the run did is on /metrics, counted by the controller itself.
    let run = RUN_TASKS as f64;
    assert!(up.metric("agentops_tasks_claimed_total").await >= run);
    assert_eq!(up.metric("agentops_tasks_completed_total").await, run);
    assert!(up.metric("agentops_pickup_latency_seconds_count").await >= run);
    assert!(up.metric("agentops_pickup_latency_seconds_sum").await > 0.0);
    assert!(
        up.metric("agentops_store_batches_total{op=\"complete\"}")
            .await
            >= 1.0
    );
    let (_, body) = http_get(&up.addr, "/metrics").await.unwrap();
    assert!(
        body.contains("agentops_queue_depth") && body.contains("agentops_lease_expiries_total"),
        "{body}"
    );
}

// ---------------------------------------------------------------------------------------------
// Presence
// ---------------------------------------------------------------------------------------------

/// Presence, live progress and the rate limiter on Redis; every call bounded while Redis is
/// down; all of it working again once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_progress_and_rate_limits_on_redis() {
    let mut redis = Server::redis();
    let timeout = Duration::from_millis(250);
    let presence = RedisPresence::connect(&redis.url(), "agentops", timeout).unwrap();
    let names = ["here".to_owned(), "gone".to_owned()];
    presence
        .seen(&names[..1], Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(presence.alive(&names).await.unwrap(), [true, false]);
    // Another installation on the same Redis (another bus prefix) has agents of its own.
    let other = RedisPresence::connect(&redis.url(), "other", timeout).unwrap();
    assert_eq!(other.alive(&names).await.unwrap(), [false, false]);
    let task = Uuid::new_v4();
    presence
        .set_progress(&[(task, "halfway".to_owned())], Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        presence.progress(task).await.unwrap().as_deref(),
        Some("halfway")
    );
    let window = Duration::from_millis(400);
    let mut granted = Vec::new();
    for _ in 0..4 {
        granted.push(presence.acquire("llm", 3, window).await.unwrap());
    }
    assert_eq!(granted, [true, true, true, false]);
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(presence.alive(&names).await.unwrap(), [false, false]);
    assert!(
        presence.acquire("llm", 3, window).await.unwrap(),
        "a new window"
    );

    redis.kill();
    let started = Instant::now();
    assert!(presence.alive(&names).await.is_err());
    assert!(presence.acquire("llm", 3, window).await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "calls to a dead Redis took {:?}",
        started.elapsed()
    );

    redis.start();
    let mut back = false;
    for _ in 0..40 {
        if presence.seen(&names, Duration::from_secs(5)).await.is_ok() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "presence works again once Redis is back");
    assert_eq!(presence.alive(&names).await.unwrap(), [true, true]);
    // A fresh Redis: the progress went with the old one.
    assert_eq!(presence.progress(task).await.unwrap(), None);
}

/// An agent that stops heartbeating goes `offline` in the store once its presence expired; an
/// agent marked `offline` that is alive comes back `idle`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_without_presence_go_offline_and_come_back() {
    let redis = Server::redis();
    let env = load_env(0).await;
    let presence = Arc::new(
        RedisPresence::connect(&redis.url(), "agentops", Duration::from_millis(250)).unwrap(),
    );
    let backends = Backends {
        bus: Arc::new(agentops::bus::InProcessBus::default()),
        presence: presence.clone(),
    };
    let heartbeat = Duration::from_millis(200);
    let controller = Controller::start(&env.db, backends, config(heartbeat)).await;
    let db = &env.db;
    let status = |name: &'static str| async move {
        db.text(&format!("SELECT status FROM agents WHERE name = '{name}'"))
            .await
            .unwrap_or_default()
    };
    let leaving = Agents::start(&controller.api, None, &["leaving"], 1, Duration::ZERO);
    let staying = Agents::start(&controller.api, None, &["staying"], 1, Duration::ZERO);
    let names = ["leaving".to_owned(), "staying".to_owned()];
    // Until its connection is up, a presence call times out: that is not absence.
    eventually(Duration::from_secs(5), "both are present", || async {
        presence.alive(&names).await.ok() == Some(vec![true, true])
    })
    .await;
    assert_eq!(status("leaving").await, "idle");

    leaving.stop().await;
    eventually(
        Duration::from_secs(5),
        "the one that left is offline",
        || async { status("leaving").await == "offline" },
    )
    .await;
    assert_eq!(presence.alive(&names).await.unwrap(), [false, true]);
    assert_eq!(status("staying").await, "idle");
    let offline: Vec<(String,)> = db
        .rows("SELECT payload ->> 'name' FROM events WHERE event_type = 'agent.offline'")
        .await;
    assert_eq!(offline, [("leaving".to_owned(),)]);

    // Marked offline by mistake (another controller's pass, a person): alive, so back.
    db.execute("UPDATE agents SET status = 'offline' WHERE name = 'staying'")
        .await;
    eventually(Duration::from_secs(5), "the live one is back", || async {
        status("staying").await == "idle"
    })
    .await;
    let online = db
        .scalar("SELECT count(*) FROM events WHERE event_type = 'agent.online'")
        .await;
    assert_eq!(online, 1);
    assert_eq!(status("leaving").await, "offline");
    assert_eq!(controller.dispatcher.metrics.presence_failures_total(), 0);
    staying.stop().await;

    // The agent the seed schema declares and that never connected is left alone.
    assert_eq!(status("cos").await, "idle");
}

// ---------------------------------------------------------------------------------------------
// The embedded bus and presence, on both stores
// ---------------------------------------------------------------------------------------------

both_backends_multi_thread!(embedded_bus_and_presence);

/// Without NATS and Redis, on either store: the outbox drains onto the in-process bus,
/// ready work is announced per pool once, and an agent that goes quiet is marked `offline`
/// and comes back `busy` when it heartbeats again.
async fn embedded_bus_and_presence<S>()
where
    S: TestStore + Queue + Outbox + Liveness,
{
    let mut env = Env::<S>::new().await;
    env.commit(
        "work",
        &[
            ("projects/p/project.yaml", Some(&project("p", "P"))),
            ("projects/p/tasks/a.yaml", Some(&task("a", "A"))),
            ("projects/p/tasks/b.yaml", Some(&task("b", "B"))),
            (
                "projects/p/tasks/w.yaml",
                Some(&format!(
                    "{API}\nkind: Task\nmetadata:\n  name: w\nspec:\n  title: W\n  \
                     assignee: writer\n  action:\n    prompt: Write\n"
                )),
            ),
        ],
    );
    env.sync().await;
    let db = &env.db;
    let store = S::open(&db.url).await;
    let id_of = |name: &'static str| async move {
        db.text(&format!(
            "SELECT CAST(id AS text) FROM tasks WHERE name = '{name}'"
        ))
        .await
        .unwrap()
    };
    let (a, b, w) = (id_of("a").await, id_of("b").await, id_of("w").await);

    let pools = |ready: Vec<ReadyTask>| -> Vec<(String, String, i64)> {
        ready
            .into_iter()
            .map(|r| (r.pool, r.task.to_string(), r.run_lease))
            .collect()
    };
    let one_each = pools(store.ready_tasks(1).await.unwrap());
    assert_eq!(one_each.len(), 2, "{one_each:?}");
    assert_eq!(one_each[0].0, "seed");
    assert!([&a, &b].contains(&&one_each[0].1), "{one_each:?}");
    assert_eq!(one_each[1], ("writer".to_owned(), w.clone(), 0));
    assert_eq!(store.ready_tasks(10).await.unwrap().len(), 3);
    let events = db.scalar("SELECT count(*) FROM events").await;
    assert_eq!(
        store
            .unpublished_events(0, 1000)
            .await
            .unwrap()
            .events
            .len() as i64,
        events
    );

    let bus = Arc::new(InProcessBus::default());
    let mut messages = bus.subscribe();
    let backends = Backends {
        bus: bus.clone(),
        presence: Arc::new(MemoryPresence::default()),
    };
    let mut config = config(Duration::from_millis(100));
    config.policy.lease = Duration::from_secs(30);
    let dispatcher = Dispatcher::with_backends(store, config, backends);
    let _loops = dispatcher.start();
    let _background = dispatcher.spawn_background();
    dispatcher.events_recorded();
    dispatcher.wake();
    // Before anything is claimed, so that all three are still ready to announce.
    eventually(
        Duration::from_secs(5),
        "the ready tasks are announced",
        || async { dispatcher.metrics.bus_published_total("announcements") >= 3 },
    )
    .await;

    let worker = AgentIdentity {
        name: "quiet".to_owned(),
        agent_type: "seed".to_owned(),
        capabilities: Vec::new(),
        concurrency: 1,
    };
    dispatcher.register(worker.clone()).await.unwrap();
    let claimed = dispatcher
        .claim(&worker, 1, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let status = || async {
        db.text("SELECT status FROM agents WHERE name = 'quiet'")
            .await
            .unwrap()
    };
    // Presence lasts 300 ms; nothing is heard from the agent.
    eventually(
        Duration::from_secs(5),
        "the quiet agent is offline",
        || async { status().await == "offline" },
    )
    .await;
    let lease = Lease {
        id: claimed[0].id,
        run_lease: claimed[0].run_lease,
    };
    let held = dispatcher.heartbeat(&worker, &[lease]).await.unwrap();
    assert!(held[0].held);
    eventually(
        Duration::from_secs(5),
        "it is back, holding its task",
        || async { status().await == "busy" },
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "every event is published",
        || async { unpublished(db).await == 0 },
    )
    .await;

    let mut seen: Vec<BusMessage> = Vec::new();
    while let Ok(message) = messages.try_recv() {
        seen.push(message);
    }
    // One subject per announcement, and per event (a message of events carries an array).
    let subjects = |prefix: &str| -> Vec<String> {
        let mut found: Vec<String> = seen
            .iter()
            .filter(|m| m.subject.starts_with(prefix))
            .flat_map(|m| {
                let count = if m.subject.starts_with("agentops.events.") {
                    events_in(&m.body).count()
                } else {
                    1
                };
                std::iter::repeat_n(m.subject.clone(), count)
            })
            .collect();
        found.sort();
        found
    };
    assert_eq!(
        subjects("agentops.dispatch."),
        [
            "agentops.dispatch.seed",
            "agentops.dispatch.seed",
            "agentops.dispatch.writer"
        ]
    );
    let announced: Vec<&str> = seen
        .iter()
        .filter(|m| m.subject == "agentops.dispatch.writer")
        .map(|m| m.message_id.as_str())
        .collect();
    assert_eq!(announced, [format!("{w}:0")]);
    let total = db.scalar("SELECT count(*) FROM events").await;
    assert_eq!(subjects("agentops.events.").len() as i64, total);
    for wanted in [
        "agentops.events.task.claimed",
        "agentops.events.agent.offline",
        "agentops.events.agent.online",
    ] {
        assert_eq!(
            subjects(wanted).len(),
            1,
            "{wanted} in {:?}",
            subjects("agentops.events.")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The outbox with transactions that commit out of order
// ---------------------------------------------------------------------------------------------

/// The relay reads on from the last outbox entry it published. An entry numbered before that
/// whose transaction commits later (a long sync, say) must still go out: the relay's periodic
/// pass from the start finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_out_of_order_is_still_published() {
    let db = TestDb::new(Backend::Postgres).await;
    let store = PgStore::open(&db.url).await;
    let Pool::Pg(pool) = &db.pool else {
        unreachable!("a Postgres database")
    };

    let bus = Arc::new(InProcessBus::default());
    let mut messages = bus.subscribe();
    let (dispatcher, _background) = relaying_to(store, bus);
    let mut subjects: Vec<String> = Vec::new();
    // The late event takes the lower outbox number but stays uncommitted…
    let mut late = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO events (event_type, payload) VALUES ('test.late', '{}')")
        .execute(&mut *late)
        .await
        .unwrap();
    // …while a later one commits and is published, which moves the relay past both numbers.
    db.execute("INSERT INTO events (event_type, payload) VALUES ('test.early', '{}')")
        .await;
    dispatcher.events_recorded();
    published(&mut messages, &mut subjects, "test.early").await;
    let (late_seq, early_seq): (i64, i64) = (
        sqlx::query_scalar("SELECT min(seq) FROM event_outbox")
            .fetch_one(&mut *late)
            .await
            .unwrap(),
        db.scalar("SELECT last_value FROM event_outbox_seq_seq")
            .await,
    );
    assert!(late_seq < early_seq, "{late_seq} < {early_seq}");

    late.commit().await.unwrap();
    dispatcher.events_recorded();
    published(&mut messages, &mut subjects, "test.late").await;
    assert_eq!(
        subjects
            .iter()
            .filter(|s| s.ends_with("test.early"))
            .count(),
        1,
        "{subjects:?}"
    );
    eventually(Duration::from_secs(5), "the outbox is empty", || async {
        db.scalar("SELECT count(*) FROM event_outbox").await == 0
    })
    .await;
}

/// A dispatcher on `store` whose background loops, the relay among them, publish to `bus`.
fn relaying_to(store: PgStore, bus: Arc<dyn Bus>) -> (Arc<Dispatcher<PgStore>>, Background) {
    let backends = Backends {
        bus,
        presence: Arc::new(MemoryPresence::default()),
    };
    let dispatcher = Dispatcher::with_backends(store, config(Duration::from_secs(1)), backends);
    let background = dispatcher.spawn_background();
    (dispatcher, background)
}

/// Waits up to 5 s for a message whose subject ends with `wanted`, noting every subject seen.
async fn published(
    messages: &mut tokio::sync::broadcast::Receiver<BusMessage>,
    seen: &mut Vec<String>,
    wanted: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !seen.iter().any(|s| s.ends_with(wanted)) {
        assert!(
            Instant::now() < deadline,
            "{wanted} not published: {seen:?}"
        );
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(100), messages.recv()).await {
            seen.push(m.subject);
        }
    }
}

/// A bus whose first publish of events fails after another event was committed, as when NATS
/// takes some of a batch's messages and then goes away. It keeps the message ids of every
/// batch it was given, as the NATS bus would make them.
struct FailingOnceBus {
    pool: sqlx::PgPool,
    batches: Mutex<Vec<Vec<String>>>,
}

impl Bus for FailingOnceBus {
    fn publish_events<'a>(
        &'a self,
        events: &'a [StoredEvent],
    ) -> agentops::bus::BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            let messages = BusMessage::events(events, &BusNames::default())?;
            let first = {
                let mut batches = self.batches.lock().unwrap();
                batches.push(messages.into_iter().map(|m| m.message_id).collect());
                batches.len() == 1
            };
            if !first {
                return Ok(());
            }
            sqlx::query("INSERT INTO events (event_type, payload) VALUES ('test.first', '{}')")
                .execute(&self.pool)
                .await
                .unwrap();
            let refused = serde_json::from_str::<Value>("not json").unwrap_err();
            Err(BusError::Encode(refused))
        })
    }

    fn announce<'a>(
        &'a self,
        _ready: &'a [ReadyTask],
    ) -> agentops::bus::BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async { Ok(()) })
    }

    fn describe(&self) -> String {
        "failing once".to_owned()
    }
}

/// After a failed publish the relay reads the outbox again, now with an event committed
/// meanwhile, and sends what failed in the same messages, with the same ids, so JetStream
/// drops those that had gone out. Events of the same type in one pass, but of two outbox
/// entries, would otherwise have been grouped into one new message and repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_of_events_is_sent_again_in_the_same_messages() {
    let db = TestDb::new(Backend::Postgres).await;
    let store = PgStore::open(&db.url).await;
    let Pool::Pg(pool) = &db.pool else {
        unreachable!("a Postgres database")
    };
    let bus = Arc::new(FailingOnceBus {
        pool: pool.clone(),
        batches: Mutex::default(),
    });
    let (dispatcher, _background) = relaying_to(store, bus.clone());
    db.execute("INSERT INTO events (event_type, payload) VALUES ('test.first', '{}')")
        .await;
    dispatcher.events_recorded();
    eventually(Duration::from_secs(10), "the outbox is empty", || async {
        db.scalar("SELECT count(*) FROM event_outbox").await == 0
    })
    .await;

    let batches = bus.batches.lock().unwrap().clone();
    assert_eq!(batches.len(), 2, "{batches:?}");
    assert_eq!(batches[0].len(), 1, "{batches:?}");
    assert_eq!(
        batches[1].len(),
        2,
        "two entries, two messages: {batches:?}"
    );
    assert_eq!(batches[1][0], batches[0][0], "the failed message, again");
    assert_eq!(
        db.scalar("SELECT count(*) FROM events WHERE event_type = 'test.first'")
            .await,
        2
    );
}

/// On Postgres a statement that writes many events queues them as one outbox entry, and the
/// relay publishes them in the order the statement wrote them. An entry whose events are gone
/// (or that holds none) is cleared all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_queues_its_events_as_one_entry() {
    let db = TestDb::new(Backend::Postgres).await;
    let store = PgStore::open(&db.url).await;
    db.execute(
        "INSERT INTO events (event_type, payload) \
         SELECT 'test.many', jsonb_build_object('n', n) FROM generate_series(1, 700) AS n",
    )
    .await;
    db.execute("INSERT INTO events (event_type, payload) SELECT 'test.none', '{}' WHERE false")
        .await;
    let (entries, queued): (i64, i64) = (
        db.scalar("SELECT count(*) FROM event_outbox").await,
        db.scalar("SELECT sum(cardinality(event_ids)) FROM event_outbox")
            .await,
    );
    assert_eq!((entries, queued), (1, 700));
    db.execute("INSERT INTO event_outbox (event_ids) VALUES ('{}'), (ARRAY[gen_random_uuid()])")
        .await;

    let bus = Arc::new(InProcessBus::default());
    let mut messages = bus.subscribe();
    let (dispatcher, _background) = relaying_to(store, bus);
    dispatcher.events_recorded();
    eventually(Duration::from_secs(10), "the outbox is empty", || async {
        db.scalar("SELECT count(*) FROM event_outbox").await == 0
    })
    .await;
    let mut published = Vec::new();
    while let Ok(message) = messages.try_recv() {
        assert_eq!(message.subject, "agentops.events.test.many");
        published.extend(events_in(&message.body).map(|e| e["payload"]["n"].as_i64().unwrap()));
    }
    assert_eq!(published, (1..=700).collect::<Vec<i64>>());
}
