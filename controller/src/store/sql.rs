//! The reconcile statements, written once for both backends.
//!
//! Every statement reads its rows from one JSON array parameter. The only differences between
//! Postgres and SQLite are how that array becomes a relation, how "now" is spelled and how a
//! parameter is named; [`Dialect`] fills those in.

/// Column types of the JSON rows, as Postgres declares them in `jsonb_to_recordset`.
#[derive(Clone, Copy, PartialEq)]
pub enum Ty {
    Uuid,
    Text,
    Int,
    BigInt,
    Bool,
    Json,
}

pub struct Dialect {
    pub now: &'static str,
    /// Seconds since the timestamp `{0}`, as a bigint.
    pub age: &'static str,
    pub postgres: bool,
}

pub const POSTGRES: Dialect = Dialect {
    now: "now()",
    age: "CAST(EXTRACT(EPOCH FROM (now() - {0})) AS bigint)",
    postgres: true,
};

pub const SQLITE: Dialect = Dialect {
    now: "strftime('%Y-%m-%dT%H:%M:%fZ','now')",
    age: "CAST((julianday('now') - julianday({0})) * 86400 AS INTEGER)",
    postgres: false,
};

impl Dialect {
    /// The JSON array parameter as a relation `r` with the given columns.
    pub fn rows(&self, columns: &[(&str, Ty)]) -> String {
        if self.postgres {
            let decl: Vec<String> = columns
                .iter()
                .map(|(name, ty)| {
                    let ty = match ty {
                        Ty::Uuid => "uuid",
                        Ty::Text => "text",
                        Ty::Int => "integer",
                        Ty::BigInt => "bigint",
                        Ty::Bool => "boolean",
                        Ty::Json => "jsonb",
                    };
                    format!("{name} {ty}")
                })
                .collect();
            format!(
                "jsonb_to_recordset(CAST($1 AS text)::jsonb) AS r({})",
                decl.join(", ")
            )
        } else {
            let cols: Vec<String> = columns
                .iter()
                .map(|(name, ty)| match ty {
                    // `->` keeps JSON text for JSON columns; `->>` gives the SQL value.
                    Ty::Json => format!("value -> '$.{name}' AS {name}"),
                    _ => format!("value ->> '$.{name}' AS {name}"),
                })
                .collect();
            format!("(SELECT {} FROM json_each(?1)) AS r", cols.join(", "))
        }
    }

    fn render(&self, template: &str, columns: &[(&str, Ty)]) -> String {
        self.sql(&template.replace("{rows}", &self.rows(columns)))
    }

    /// Spell `{now}` and the `$N` parameters of a statement the way this backend wants.
    pub fn sql(&self, statement: &str) -> String {
        let statement = statement.replace("{now}", self.now);
        if self.postgres {
            return statement;
        }
        let mut out = String::with_capacity(statement.len());
        let mut chars = statement.chars().peekable();
        while let Some(c) = chars.next() {
            let numbered = chars.peek().is_some_and(char::is_ascii_digit);
            out.push(if c == '$' && numbered { '?' } else { c });
        }
        out
    }
}

const OBJECT: [(&str, Ty); 9] = [
    ("id", Ty::Uuid),
    ("name", Ty::Text),
    ("source", Ty::Text),
    ("revision", Ty::Text),
    ("path", Ty::Text),
    ("generation", Ty::BigInt),
    ("spec_hash", Ty::Text),
    ("metadata", Ty::Json),
    ("revive", Ty::Bool),
];

fn with(extra: &[(&'static str, Ty)]) -> Vec<(&'static str, Ty)> {
    OBJECT.iter().chain(extra).copied().collect()
}

/// Columns every reconciled object carries, set from the row.
const OBJECT_SET: &str = "source = r.source, path = r.path, revision = r.revision, \
     generation = r.generation, spec_hash = r.spec_hash, metadata = r.metadata, status_message = NULL";

pub struct Statements {
    pub insert: String,
    pub update: String,
    pub prune: String,
    pub flag: String,
}

/// The spec's columns of each table, beside the ones every object has.
const PROJECT_COLUMNS: [(&str, Ty); 6] = [
    ("title", Ty::Text),
    ("description", Ty::Text),
    ("priority", Ty::Int),
    ("owner", Ty::Text),
    ("labels", Ty::Json),
    ("suspend", Ty::Bool),
];

const TASK_COLUMNS: [(&str, Ty); 12] = [
    ("project_id", Ty::Uuid),
    ("title", Ty::Text),
    ("description", Ty::Text),
    ("assignee", Ty::Text),
    ("priority", Ty::Int),
    ("capabilities", Ty::Json),
    ("depends_on", Ty::Json),
    ("action", Ty::Json),
    ("output", Ty::Json),
    ("acceptance_criteria", Ty::Json),
    ("timeout_seconds", Ty::Int),
    ("retries", Ty::Int),
];

const AGENT_COLUMNS: [(&str, Ty); 5] = [
    ("type", Ty::Text),
    ("capabilities", Ty::Json),
    ("models", Ty::Json),
    ("concurrency", Ty::Int),
    ("instructions", Ty::Text),
];

const TOOL_COLUMNS: [(&str, Ty); 4] = [
    ("description", Ty::Text),
    ("tool_type", Ty::Text),
    ("created_by", Ty::Text),
    ("implementation", Ty::Json),
];

/// The spec's columns and `metadata` of the rows whose ids the JSON array names, each row as
/// one JSON object (`id`, `fields`) shaped like the rows a sync writes.
fn fields(d: &Dialect, table: &str, columns: &[(&str, Ty)]) -> String {
    let columns = columns
        .iter()
        .filter(|(name, _)| *name != "project_id")
        .chain(&[("metadata", Ty::Json)]);
    let pairs: Vec<String> = columns
        .map(|&(name, ty)| {
            let value = match (d.postgres, ty) {
                (true, _) | (false, Ty::Text | Ty::Int | Ty::BigInt | Ty::Uuid) => {
                    format!("x.{name}")
                }
                (false, Ty::Json) => format!("json(x.{name})"),
                // SQLite keeps booleans as 0 and 1.
                (false, Ty::Bool) => {
                    format!("CASE WHEN x.{name} THEN json('true') ELSE json('false') END")
                }
            };
            format!("'{name}', {value}")
        })
        .collect();
    let object = if d.postgres {
        format!("CAST(jsonb_build_object({}) AS text)", pairs.join(", "))
    } else {
        format!("json_object({})", pairs.join(", "))
    };
    d.render(
        &format!(
            "SELECT CAST(x.id AS text) AS id, {object} AS fields FROM {table} x \
             WHERE x.id IN (SELECT r.id FROM {{rows}})"
        ),
        &[("id", Ty::Uuid)],
    )
}

fn project(d: &Dialect) -> Statements {
    let cols = with(&PROJECT_COLUMNS);
    Statements {
        insert: d.render(
            "INSERT INTO projects (id, name, title, description, priority, owner, labels, suspend, \
             source, path, revision, generation, spec_hash, metadata) \
             SELECT r.id, r.name, r.title, r.description, r.priority, r.owner, r.labels, r.suspend, \
             r.source, r.path, r.revision, r.generation, r.spec_hash, r.metadata FROM {rows}",
            &cols,
        ),
        update: d.render(
            &format!(
                "UPDATE projects SET title = r.title, description = r.description, \
                 priority = r.priority, owner = r.owner, labels = r.labels, suspend = r.suspend, \
                 {OBJECT_SET}, \
                 status = CASE WHEN r.revive THEN 'active' ELSE projects.status END, \
                 completed_at = CASE WHEN r.revive THEN NULL ELSE projects.completed_at END, \
                 pruned_at = CASE WHEN r.revive THEN NULL ELSE projects.pruned_at END \
                 FROM {{rows}} WHERE projects.id = r.id"
            ),
            &cols,
        ),
        prune: d.render(
            "UPDATE projects SET pruned_at = {now}, \
             status = CASE WHEN projects.status = 'completed' THEN projects.status ELSE 'cancelled' END \
             FROM {rows} WHERE projects.id = r.id",
            &[("id", Ty::Uuid)],
        ),
        flag: d.render(
            "UPDATE projects SET status_message = r.message FROM {rows} WHERE projects.id = r.id",
            &[("id", Ty::Uuid), ("message", Ty::Text)],
        ),
    }
}

fn task(d: &Dialect) -> Statements {
    let cols = with(&TASK_COLUMNS);
    // A task that comes back after being pruned starts a new life: no attempt, no lease.
    let revive = |column: &str, value: &str| {
        format!("{column} = CASE WHEN r.revive THEN {value} ELSE tasks.{column} END")
    };
    let resets = [
        revive("status", "'pending'"),
        revive("attempt", "0"),
        revive("pruned_at", "NULL"),
        revive("started_at", "NULL"),
        revive("completed_at", "NULL"),
        revive("result", "NULL"),
        revive("error", "NULL"),
        revive("lease_owner", "NULL"),
        revive("lease_expires_at", "NULL"),
        revive("not_before", "NULL"),
    ]
    .join(", ");
    Statements {
        insert: d.render(
            "INSERT INTO tasks (id, project_id, name, title, description, assigned_to, assignee, \
             priority, capabilities, depends_on, action, output, acceptance_criteria, \
             timeout_seconds, retries, source, path, revision, generation, spec_hash, metadata) \
             SELECT r.id, r.project_id, r.name, r.title, r.description, r.assignee, r.assignee, \
             r.priority, r.capabilities, r.depends_on, r.action, r.output, r.acceptance_criteria, \
             r.timeout_seconds, r.retries, r.source, r.path, r.revision, r.generation, \
             r.spec_hash, r.metadata FROM {rows}",
            &cols,
        ),
        update: d.render(
            &format!(
                "UPDATE tasks SET project_id = r.project_id, title = r.title, \
                 description = r.description, assignee = r.assignee, \
                 assigned_to = CASE WHEN r.revive OR tasks.status = 'pending' \
                     THEN r.assignee ELSE tasks.assigned_to END, \
                 priority = r.priority, capabilities = r.capabilities, depends_on = r.depends_on, \
                 action = r.action, output = r.output, acceptance_criteria = r.acceptance_criteria, \
                 timeout_seconds = r.timeout_seconds, retries = r.retries, {OBJECT_SET}, {resets} \
                 FROM {{rows}} WHERE tasks.id = r.id"
            ),
            &cols,
        ),
        // Work that already ended keeps its outcome; anything still open is cancelled, and
        // its lease is dropped so the holder's next heartbeat is refused.
        prune: d.render(
            "UPDATE tasks SET pruned_at = {now}, lease_owner = NULL, lease_expires_at = NULL, \
             status = CASE WHEN tasks.status IN ('completed', 'failed', 'cancelled') \
                 THEN tasks.status ELSE 'cancelled' END \
             FROM {rows} WHERE tasks.id = r.id",
            &[("id", Ty::Uuid)],
        ),
        flag: d.render(
            "UPDATE tasks SET status_message = r.message FROM {rows} WHERE tasks.id = r.id",
            &[("id", Ty::Uuid), ("message", Ty::Text)],
        ),
    }
}

fn agent(d: &Dialect) -> Statements {
    let cols = with(&AGENT_COLUMNS);
    // Agents are unique by name and may already exist (the seeded `cos` and `seed`, or one
    // registered through the API), so declaring one adopts the row.
    let upsert = d.render(
        "INSERT INTO agents (id, name, type, capabilities, models, concurrency, instructions, \
         source, path, revision, generation, spec_hash, metadata) \
         SELECT r.id, r.name, r.type, r.capabilities, r.models, r.concurrency, r.instructions, \
         r.source, r.path, r.revision, r.generation, r.spec_hash, r.metadata FROM {rows} WHERE true \
         ON CONFLICT (name) DO UPDATE SET type = excluded.type, \
         capabilities = excluded.capabilities, models = excluded.models, \
         concurrency = excluded.concurrency, instructions = excluded.instructions, \
         source = excluded.source, path = excluded.path, revision = excluded.revision, \
         generation = excluded.generation, spec_hash = excluded.spec_hash, metadata = excluded.metadata, \
         status_message = NULL, \
         status = CASE WHEN agents.pruned_at IS NULL THEN agents.status ELSE 'offline' END, \
         pruned_at = NULL",
        &cols,
    );
    Statements {
        insert: upsert.clone(),
        update: upsert,
        prune: d.render(
            "UPDATE agents SET pruned_at = {now}, status = 'offline' \
             FROM {rows} WHERE agents.name = r.name",
            &[("name", Ty::Text)],
        ),
        flag: d.render(
            "UPDATE agents SET status_message = r.message FROM {rows} WHERE agents.name = r.name",
            &[("name", Ty::Text), ("message", Ty::Text)],
        ),
    }
}

fn tool(d: &Dialect) -> Statements {
    let cols = with(&TOOL_COLUMNS);
    let upsert = d.render(
        "INSERT INTO tools (id, name, description, created_by, tool_type, implementation, \
         source, path, revision, generation, spec_hash, metadata) \
         SELECT r.id, r.name, r.description, r.created_by, r.tool_type, r.implementation, \
         r.source, r.path, r.revision, r.generation, r.spec_hash, r.metadata FROM {rows} WHERE true \
         ON CONFLICT (name) DO UPDATE SET description = excluded.description, \
         created_by = excluded.created_by, tool_type = excluded.tool_type, \
         implementation = excluded.implementation, source = excluded.source, \
         path = excluded.path, revision = excluded.revision, generation = excluded.generation, \
         spec_hash = excluded.spec_hash, metadata = excluded.metadata, status_message = NULL, \
         pruned_at = NULL",
        &cols,
    );
    Statements {
        insert: upsert.clone(),
        update: upsert,
        prune: d.render(
            "UPDATE tools SET pruned_at = {now} FROM {rows} WHERE tools.name = r.name",
            &[("name", Ty::Text)],
        ),
        flag: d.render(
            "UPDATE tools SET status_message = r.message FROM {rows} WHERE tools.name = r.name",
            &[("name", Ty::Text), ("message", Ty::Text)],
        ),
    }
}

/// Rendered once per process; `&'static` so sqlx accepts them as audited SQL (they are built
/// from the constants in this file only).
pub static POSTGRES_SQL: std::sync::LazyLock<Sql> =
    std::sync::LazyLock::new(|| Sql::new(&POSTGRES));
pub static SQLITE_SQL: std::sync::LazyLock<Sql> = std::sync::LazyLock::new(|| Sql::new(&SQLITE));

/// Every reconcile statement of one backend, rendered once.
pub struct Sql {
    pub projects: Statements,
    pub tasks: Statements,
    pub agents: Statements,
    pub tools: Statements,
    pub events: String,
    pub load: String,
    pub cursor: String,
    pub load_cursor: String,
    pub project_status: String,
    pub task_status: String,
    pub source_status: String,
    /// Per table, in [`Sql::table`]'s names: what `fields` reads.
    pub fields: [(&'static str, String); 4],
}

impl Sql {
    pub fn new(d: &Dialect) -> Sql {
        Sql {
            projects: project(d),
            tasks: task(d),
            agents: agent(d),
            tools: tool(d),
            events: insert_events(d),
            load: d.sql(LOAD),
            cursor: d.sql(CURSOR),
            load_cursor: d
                .sql("SELECT revision, tree_oid, errors FROM sync_sources WHERE name = $1"),
            project_status: d.sql(
                "SELECT name, status, status_message FROM projects \
                 WHERE CAST($1 AS text) IS NULL OR name = $1 ORDER BY name",
            ),
            task_status: d.sql(&format!(
                "SELECT p.name AS project, COALESCE(t.name, t.title) AS name, t.status, \
                 COALESCE(t.lease_owner, t.assigned_to) AS agent, t.attempt, t.status_message, \
                 {} AS age_seconds \
                 FROM tasks t JOIN projects p ON p.id = t.project_id \
                 WHERE CAST($1 AS text) IS NULL OR p.name = $1 \
                 ORDER BY p.name, t.priority DESC, t.created_at, t.name",
                d.age.replace("{0}", "t.created_at")
            )),
            source_status: d
                .sql("SELECT name, url, revision, errors FROM sync_sources ORDER BY name"),
            fields: [
                ("projects", fields(d, "projects", &PROJECT_COLUMNS)),
                ("tasks", fields(d, "tasks", &TASK_COLUMNS)),
                ("agents", fields(d, "agents", &AGENT_COLUMNS)),
                ("tools", fields(d, "tools", &TOOL_COLUMNS)),
            ],
        }
    }

    pub fn table(&self, table: &str) -> &Statements {
        match table {
            "projects" => &self.projects,
            "tasks" => &self.tasks,
            "agents" => &self.agents,
            _ => &self.tools,
        }
    }
}

const CURSOR: &str = "\
    INSERT INTO sync_sources (name, url, branch, path, revision, tree_oid, synced_at, errors) \
    VALUES ($1, $2, $3, $4, $5, $6, {now}, $7) \
    ON CONFLICT (name) DO UPDATE SET url = excluded.url, branch = excluded.branch, \
    path = excluded.path, revision = excluded.revision, tree_oid = excluded.tree_oid, \
    synced_at = excluded.synced_at, errors = excluded.errors";

fn insert_events(d: &Dialect) -> String {
    d.render(
        "INSERT INTO events (id, event_type, source_agent, payload) \
         SELECT r.id, r.event_type, 'controller', r.payload FROM {rows}",
        &[
            ("id", Ty::Uuid),
            ("event_type", Ty::Text),
            ("payload", Ty::Json),
        ],
    )
}

/// Everything a source has put in the store, as (kind, id, name, project, …) rows.
pub const LOAD: &str = "\
    SELECT 'project' AS kind, CAST(p.id AS text) AS id, p.name, NULL AS project, p.path, \
        p.spec_hash, p.generation, p.status_message, p.pruned_at IS NOT NULL AS pruned \
    FROM projects p WHERE p.source = $1 \
    UNION ALL \
    SELECT 'task', CAST(t.id AS text), t.name, p.name, t.path, t.spec_hash, t.generation, \
        t.status_message, t.pruned_at IS NOT NULL \
    FROM tasks t JOIN projects p ON p.id = t.project_id WHERE t.source = $1 \
    UNION ALL \
    SELECT 'agent', CAST(a.id AS text), a.name, NULL, a.path, a.spec_hash, a.generation, \
        a.status_message, a.pruned_at IS NOT NULL \
    FROM agents a WHERE a.source = $1 \
    UNION ALL \
    SELECT 'tool', CAST(x.id AS text), x.name, NULL, x.path, x.spec_hash, x.generation, \
        x.status_message, x.pruned_at IS NOT NULL \
    FROM tools x WHERE x.source = $1";
