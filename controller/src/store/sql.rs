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
    pub postgres: bool,
}

pub const POSTGRES: Dialect = Dialect { postgres: true };

pub const SQLITE: Dialect = Dialect { postgres: false };

/// A statement template with a token no dialect spells: a mistake in this crate's SQL, found
/// when the statements are rendered at connect (and by the test that renders them all).
#[derive(Debug, Clone, thiserror::Error)]
#[error("a statement template has the unknown token `{0}`")]
pub struct Unspellable(pub String);

/// SQLite's one timestamp format, as the schema keeps times.
const SQLITE_NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

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

    pub fn render(&self, template: &str, columns: &[(&str, Ty)]) -> Result<String, Unspellable> {
        self.spell(&template.replace("{rows}", &self.rows(columns)))
    }

    /// Spell a template's tokens and its `$N` parameters the way this backend wants:
    ///
    /// `{now}`; `{lock}` (a row lock where there is one); `{id:N}` (text parameter N as an
    /// id); `{json:N}` (text parameter N as JSON); `{after:N}` (now plus parameter N
    /// milliseconds); `{backoff:COL,B,M}` (now plus the wait before the retry that follows
    /// attempt COL: `min(B << min(max(COL, 0), 20), M)` milliseconds, B and M parameters);
    /// `{ts:COL}` (a timestamp as RFC 3339 text, whole seconds); `{text:COL}` (a uuid or
    /// JSON column as text); `{age:COL}` (seconds since a timestamp, as a bigint);
    /// `{each:EXPR}` (a JSON array of strings as the relation `d(value)`); `{head:EXPR}` and
    /// `{tail:EXPR}` (the parts of `project/task` before and after the slash);
    /// `{has_table:NAME}` (whether the table exists); `{time:COL}` (a timestamp as RFC 3339
    /// text to the millisecond, as SQLite keeps them); `{ago:N}` (now less parameter N
    /// milliseconds); `{age_ms:COL}` (milliseconds since a timestamp); `{values:N}` (the JSON
    /// array parameter N as the relation `v(value)`); `{each_n:EXPR}` (like `each`, with the
    /// elements' positions as `d.key`); `{skip_locked}` (lock the rows, passing over those
    /// another transaction holds, where rows can be locked); `{rows:COL TYPE,…}` (the JSON
    /// array parameter 1 as the relation `r` of these columns).
    pub fn spell(&self, template: &str) -> Result<String, Unspellable> {
        let mut out = String::with_capacity(template.len() + 64);
        let mut rest = template;
        while let Some(start) = rest.find('{') {
            out.push_str(&rest[..start]);
            let Some(len) = rest[start..].find('}') else {
                return Err(Unspellable(rest[start..].to_owned()));
            };
            let token = &rest[start + 1..start + len];
            let spelled = self
                .token(token)
                .ok_or_else(|| Unspellable(token.to_owned()))?;
            out.push_str(&spelled);
            rest = &rest[start + len + 1..];
        }
        out.push_str(rest);
        if self.postgres {
            return Ok(out);
        }
        let mut numbered = String::with_capacity(out.len());
        let mut chars = out.chars().peekable();
        while let Some(c) = chars.next() {
            let param = chars.peek().is_some_and(char::is_ascii_digit);
            numbered.push(if c == '$' && param { '?' } else { c });
        }
        Ok(numbered)
    }

    fn token(&self, token: &str) -> Option<String> {
        let pg = self.postgres;
        let (name, arg) = token.split_once(':').unwrap_or((token, ""));
        let number = || arg.parse::<u32>().ok();
        Some(match name {
            "now" if pg => "now()".to_owned(),
            "now" => SQLITE_NOW.to_owned(),
            "lock" => if pg { "FOR UPDATE" } else { "" }.to_owned(),
            "id" if pg => format!("CAST(CAST(${} AS text) AS uuid)", number()?),
            "json" if pg => format!("CAST(${} AS text)::jsonb", number()?),
            "id" | "json" => format!("${}", number()?),
            "after" => self.later(&format!("${}", number()?)),
            "backoff" => {
                let [column, base, max] = arg.split(',').collect::<Vec<_>>()[..] else {
                    return None;
                };
                let (base, max) = (base.parse::<u32>().ok()?, max.parse::<u32>().ok()?);
                let (least, greatest) = if pg {
                    ("LEAST", "GREATEST")
                } else {
                    ("min", "max")
                };
                self.later(&format!(
                    "{least}(${base} << {least}({greatest}({column}, 0), 20), ${max})"
                ))
            }
            "ts" if pg => {
                format!("to_char({arg} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')")
            }
            "ts" => format!("strftime('%Y-%m-%dT%H:%M:%SZ', {arg})"),
            "text" if pg => format!("CAST({arg} AS text)"),
            "text" => arg.to_owned(),
            "age" if pg => format!("CAST(EXTRACT(EPOCH FROM (now() - {arg})) AS bigint)"),
            "age" => format!("CAST((julianday('now') - julianday({arg})) * 86400 AS INTEGER)"),
            "each" if pg => format!("jsonb_array_elements_text({arg}) AS d(value)"),
            "each" => format!("json_each({arg}) AS d"),
            "head" if pg => format!("split_part({arg}, '/', 1)"),
            "head" => format!("substr({arg}, 1, instr({arg}, '/') - 1)"),
            "tail" if pg => format!("split_part({arg}, '/', 2)"),
            "tail" => format!("substr({arg}, instr({arg}, '/') + 1)"),
            "has_table" if pg => format!("to_regclass('{arg}') IS NOT NULL"),
            "has_table" => format!(
                "EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '{arg}')"
            ),
            "time" if pg => {
                format!("to_char({arg} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')")
            }
            "time" => arg.to_owned(),
            "ago" if pg => format!("now() - ${} * interval '1 millisecond'", number()?),
            "ago" => format!(
                "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', printf('-%.3f seconds', ${} / 1000.0))",
                number()?
            ),
            "age_ms" if pg => {
                format!("CAST(EXTRACT(EPOCH FROM (now() - {arg})) * 1000 AS bigint)")
            }
            "age_ms" => {
                format!("CAST((julianday('now') - julianday({arg})) * 86400000 AS INTEGER)")
            }
            "values" if pg => format!(
                "jsonb_array_elements_text(CAST(${} AS text)::jsonb) AS v(value)",
                number()?
            ),
            "values" => format!("json_each(${}) AS v", number()?),
            "each_n" if pg => {
                format!("jsonb_array_elements_text({arg}) WITH ORDINALITY AS d(value, key)")
            }
            "each_n" => format!("json_each({arg}) AS d"),
            "skip_locked" => if pg { "FOR UPDATE SKIP LOCKED" } else { "" }.to_owned(),
            "rows" => {
                let columns = arg
                    .split(',')
                    .map(|column| {
                        let (name, ty) = column.trim().split_once(' ')?;
                        let ty = match ty.trim() {
                            "uuid" => Ty::Uuid,
                            "text" => Ty::Text,
                            "integer" => Ty::Int,
                            "bigint" => Ty::BigInt,
                            "boolean" => Ty::Bool,
                            "json" => Ty::Json,
                            _ => return None,
                        };
                        Some((name, ty))
                    })
                    .collect::<Option<Vec<_>>>()?;
                self.rows(&columns)
            }
            _ => return None,
        })
    }

    /// This backend's own template of a statement whose plan differs between the engines.
    pub fn pick(&self, postgres: &'static str, sqlite: &'static str) -> &'static str {
        if self.postgres { postgres } else { sqlite }
    }

    /// Now plus `ms` milliseconds (an SQL expression).
    fn later(&self, ms: &str) -> String {
        if self.postgres {
            format!("now() + {ms} * interval '1 millisecond'")
        } else {
            format!("strftime('%Y-%m-%dT%H:%M:%fZ', 'now', printf('+%.3f seconds', {ms} / 1000.0))")
        }
    }
}

/// Declares a set of statement templates as a struct of the statements spelled for one
/// dialect, and lists them all (for the test that prepares every statement on both backends).
macro_rules! statements {
    ($(#[$meta:meta])* $name:ident { $($(#[$doc:meta])* $field:ident = $template:expr,)* }) => {
        $crate::store::sql::statements! {
            $(#[$meta])* $name(_d) { $($(#[$doc])* $field = $template,)* }
        }
    };
    ($(#[$meta:meta])* $name:ident($d:ident) { $($(#[$doc:meta])* $field:ident = $template:expr,)* }) => {
        $(#[$meta])*
        pub struct $name {
            $(pub $field: String,)*
        }

        impl $name {
            pub fn new($d: &$crate::store::sql::Dialect) -> Result<Self, $crate::store::sql::Unspellable> {
                Ok($name { $($field: $d.spell($template)?,)* })
            }

            pub fn all(&self) -> Vec<(&'static str, &str)> {
                vec![$((stringify!($field), self.$field.as_str()),)*]
            }
        }
    };
}
pub(crate) use statements;

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
fn fields(d: &Dialect, table: &str, columns: &[(&str, Ty)]) -> Result<String, Unspellable> {
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

fn project(d: &Dialect) -> Result<Statements, Unspellable> {
    let cols = with(&PROJECT_COLUMNS);
    let prune = "status = CASE WHEN projects.status = 'completed' THEN projects.status \
        ELSE 'cancelled' END";
    keyed(d, "projects", ("id", Ty::Uuid), prune, Statements {
        insert: d.render(
            "INSERT INTO projects (id, name, title, description, priority, owner, labels, suspend, \
             source, path, revision, generation, spec_hash, metadata) \
             SELECT r.id, r.name, r.title, r.description, r.priority, r.owner, r.labels, r.suspend, \
             r.source, r.path, r.revision, r.generation, r.spec_hash, r.metadata FROM {rows}",
            &cols,
        )?,
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
        )?,
        prune: String::new(),
        flag: String::new(),
    })
}

fn task(d: &Dialect) -> Result<Statements, Unspellable> {
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
    // Work that already ended keeps its outcome; anything still open is cancelled, and its
    // lease is dropped so the holder's next heartbeat is refused.
    let prune = "lease_owner = NULL, lease_expires_at = NULL, \
        status = CASE WHEN tasks.status IN ('completed', 'failed', 'cancelled') \
        THEN tasks.status ELSE 'cancelled' END";
    keyed(d, "tasks", ("id", Ty::Uuid), prune, Statements {
        insert: d.render(
            "INSERT INTO tasks (id, project_id, name, title, description, assigned_to, assignee, \
             priority, capabilities, depends_on, action, output, acceptance_criteria, \
             timeout_seconds, retries, source, path, revision, generation, spec_hash, metadata) \
             SELECT r.id, r.project_id, r.name, r.title, r.description, r.assignee, r.assignee, \
             r.priority, r.capabilities, r.depends_on, r.action, r.output, r.acceptance_criteria, \
             r.timeout_seconds, r.retries, r.source, r.path, r.revision, r.generation, \
             r.spec_hash, r.metadata FROM {rows}",
            &cols,
        )?,
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
        )?,
        prune: String::new(),
        flag: String::new(),
    })
}

// Agents and tools are unique by name and may already exist (the seeded `cos` and `seed`, or
// one registered through the API), so declaring one adopts the row.
fn agent(d: &Dialect) -> Result<Statements, Unspellable> {
    let revive = "status = CASE WHEN agents.pruned_at IS NULL THEN agents.status \
        ELSE 'offline' END, ";
    let upsert = upsert(d, "agents", &AGENT_COLUMNS, revive)?;
    let prune = "status = 'offline'";
    keyed(
        d,
        "agents",
        ("name", Ty::Text),
        prune,
        Statements::both(upsert),
    )
}

fn tool(d: &Dialect) -> Result<Statements, Unspellable> {
    let upsert = upsert(d, "tools", &TOOL_COLUMNS, "")?;
    keyed(d, "tools", ("name", Ty::Text), "", Statements::both(upsert))
}

/// Insert or adopt by name, setting `revive` too.
fn upsert(
    d: &Dialect,
    table: &str,
    columns: &[(&'static str, Ty)],
    revive: &str,
) -> Result<String, Unspellable> {
    let object = [
        "source",
        "path",
        "revision",
        "generation",
        "spec_hash",
        "metadata",
    ];
    let set: Vec<&str> = columns
        .iter()
        .map(|(name, _)| *name)
        .chain(object)
        .collect();
    let all: Vec<&str> = ["id", "name"]
        .into_iter()
        .chain(set.iter().copied())
        .collect();
    let picked: Vec<String> = all.iter().map(|c| format!("r.{c}")).collect();
    let excluded: Vec<String> = set.iter().map(|c| format!("{c} = excluded.{c}")).collect();
    d.render(
        &format!(
            "INSERT INTO {table} ({}) SELECT {} FROM {{rows}} WHERE true \
             ON CONFLICT (name) DO UPDATE SET {}, status_message = NULL, {revive}pruned_at = NULL",
            all.join(", "),
            picked.join(", "),
            excluded.join(", ")
        ),
        &with(columns),
    )
}

/// A table's statements with the prune (which also sets `prune`) and the flag of the rows
/// found by `key`.
fn keyed(
    d: &Dialect,
    table: &str,
    (key, ty): (&str, Ty),
    prune: &str,
    writes: Statements,
) -> Result<Statements, Unspellable> {
    let prune = if prune.is_empty() {
        String::new()
    } else {
        format!(", {prune}")
    };
    let by_key = format!("FROM {{rows}} WHERE {table}.{key} = r.{key}");
    Ok(Statements {
        prune: d.render(
            &format!("UPDATE {table} SET pruned_at = {{now}}{prune} {by_key}"),
            &[(key, ty)],
        )?,
        flag: d.render(
            &format!("UPDATE {table} SET status_message = r.message {by_key}"),
            &[(key, ty), ("message", Ty::Text)],
        )?,
        ..writes
    })
}

impl Statements {
    /// An upsert serves as both insert and update.
    fn both(upsert: String) -> Statements {
        Statements {
            insert: upsert.clone(),
            update: upsert,
            prune: String::new(),
            flag: String::new(),
        }
    }
}

/// Rendered once per process, when the first store connects; `&'static` so sqlx accepts them
/// as audited SQL (they are built from this crate's constants only).
pub static POSTGRES_SQL: std::sync::LazyLock<Result<Sql, Unspellable>> =
    std::sync::LazyLock::new(|| Sql::new(&POSTGRES));
pub static SQLITE_SQL: std::sync::LazyLock<Result<Sql, Unspellable>> =
    std::sync::LazyLock::new(|| Sql::new(&SQLITE));

/// Every statement of the store for one backend, rendered once.
pub struct Sql {
    pub projects: Statements,
    pub tasks: Statements,
    pub agents: Statements,
    pub tools: Statements,
    pub events: String,
    /// Events from a JSON array of `{type, agent, payload}`.
    pub add_events: String,
    /// Per table, in [`Sql::table`]'s names: what `fields` reads.
    pub fields: [(&'static str, String); 4],
    pub core: Core,
    pub writeback: super::writeback::Statements,
    pub registry: super::tools::Statements,
    pub usage: super::usage::Statements,
    pub queue: super::queue_db::Statements,
}

statements! {
    /// The statements of [`super::Store`] beside the plan's batches.
    Core {
        load = LOAD,
        cursor = CURSOR,
        load_cursor = "SELECT revision, tree_oid, errors FROM sync_sources WHERE name = $1",
        project_status = "SELECT name, status, status_message FROM projects \
            WHERE CAST($1 AS text) IS NULL OR name = $1 ORDER BY name",
        task_status = "SELECT p.name AS project, COALESCE(t.name, t.title) AS name, t.status, \
            COALESCE(t.lease_owner, t.assigned_to) AS agent, t.attempt, t.status_message, \
            {age:t.created_at} AS age_seconds \
            FROM tasks t JOIN projects p ON p.id = t.project_id \
            WHERE CAST($1 AS text) IS NULL OR p.name = $1 \
            ORDER BY p.name, t.priority DESC, t.created_at, t.name",
        source_status = "SELECT name, url, revision, errors FROM sync_sources ORDER BY name",
        open_tasks = OPEN_TASKS,
        has_schema = "SELECT {has_table:sync_sources}",
        has_migrations = "SELECT {has_table:_sqlx_migrations}",
        reword_migration = "UPDATE _sqlx_migrations SET checksum = $1 \
            WHERE version = $2 AND checksum = $3",
    }
}

impl Sql {
    pub fn new(d: &Dialect) -> Result<Sql, Unspellable> {
        Ok(Sql {
            projects: project(d)?,
            tasks: task(d)?,
            agents: agent(d)?,
            tools: tool(d)?,
            events: insert_events(d)?,
            add_events: d.render(
                "INSERT INTO events (event_type, source_agent, payload) \
                 SELECT r.type, r.agent, r.payload FROM {rows}",
                &[
                    ("type", Ty::Text),
                    ("agent", Ty::Text),
                    ("payload", Ty::Json),
                ],
            )?,
            fields: [
                ("projects", fields(d, "projects", &PROJECT_COLUMNS)?),
                ("tasks", fields(d, "tasks", &TASK_COLUMNS)?),
                ("agents", fields(d, "agents", &AGENT_COLUMNS)?),
                ("tools", fields(d, "tools", &TOOL_COLUMNS)?),
            ],
            core: Core::new(d)?,
            writeback: super::writeback::Statements::new(d)?,
            registry: super::tools::Statements::new(d)?,
            usage: super::usage::Statements::new(d)?,
            queue: super::queue_db::Statements::new(d)?,
        })
    }

    pub fn table(&self, table: &str) -> &Statements {
        match table {
            "projects" => &self.projects,
            "tasks" => &self.tasks,
            "agents" => &self.agents,
            _ => &self.tools,
        }
    }

    /// Every statement, by name.
    pub fn all(&self) -> Vec<(&'static str, &str)> {
        let mut all = vec![
            ("events", self.events.as_str()),
            ("add_events", self.add_events.as_str()),
        ];
        for (table, statements) in [
            ("projects", &self.projects),
            ("tasks", &self.tasks),
            ("agents", &self.agents),
            ("tools", &self.tools),
        ] {
            all.extend([
                (table, statements.insert.as_str()),
                (table, statements.update.as_str()),
                (table, statements.prune.as_str()),
                (table, statements.flag.as_str()),
            ]);
        }
        all.extend(self.fields.iter().map(|(table, s)| (*table, s.as_str())));
        all.extend(self.core.all());
        all.extend(self.writeback.all());
        all.extend(self.registry.all());
        all.extend(self.usage.all());
        all.extend(self.queue.all());
        all
    }
}

/// Pending or in-progress tasks that can move without a person (see `Store::open_tasks`).
const OPEN_TASKS: &str = "SELECT count(*) FROM tasks t \
    WHERE t.pruned_at IS NULL AND (t.status = 'in_progress' OR (t.status = 'pending' \
    AND NOT EXISTS (SELECT 1 FROM projects sp WHERE sp.id = t.project_id AND sp.suspend) \
    AND NOT EXISTS (SELECT 1 FROM {each:t.depends_on} \
        WHERE NOT EXISTS (SELECT 1 FROM tasks dt JOIN projects dp ON dp.id = dt.project_id \
            WHERE dp.name = {head:d.value} AND dt.name = {tail:d.value} \
            AND dt.status = 'completed'))))";

const CURSOR: &str = "\
    INSERT INTO sync_sources (name, url, branch, path, revision, tree_oid, synced_at, errors) \
    VALUES ($1, $2, $3, $4, $5, $6, {now}, {json:7}) \
    ON CONFLICT (name) DO UPDATE SET url = excluded.url, branch = excluded.branch, \
    path = excluded.path, revision = excluded.revision, tree_oid = excluded.tree_oid, \
    synced_at = excluded.synced_at, errors = excluded.errors";

fn insert_events(d: &Dialect) -> Result<String, Unspellable> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_statement_renders_for_both_dialects() {
        for (dialect, sql) in [(&POSTGRES, &*POSTGRES_SQL), (&SQLITE, &*SQLITE_SQL)] {
            let sql = sql.as_ref().expect("every template spells");
            let all = sql.all();
            assert!(all.len() > 40, "{} statements", all.len());
            for (name, statement) in all {
                assert!(!statement.contains('{'), "{name}: {statement}");
                let numbered = statement
                    .match_indices('$')
                    .any(|(i, _)| statement[i + 1..].starts_with(|c: char| c.is_ascii_digit()));
                assert_eq!(
                    numbered,
                    dialect.postgres && numbered,
                    "{name}: {statement}"
                );
            }
        }
    }

    #[test]
    fn spells_tokens_per_backend() {
        assert_eq!(
            POSTGRES
                .spell("WHERE id = {id:1} AND x = $2 AND t < {now}")
                .unwrap(),
            "WHERE id = CAST(CAST($1 AS text) AS uuid) AND x = $2 AND t < now()"
        );
        assert_eq!(
            SQLITE
                .spell("WHERE id = {id:1} AND x = $2 AND t < {now}")
                .unwrap(),
            "WHERE id = ?1 AND x = ?2 AND t < strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
        );
        assert_eq!(
            SQLITE.spell("SELECT {text:t.id} {lock}").unwrap(),
            "SELECT t.id "
        );
        assert_eq!(
            POSTGRES.spell("SELECT {text:t.id} {lock}").unwrap(),
            "SELECT CAST(t.id AS text) FOR UPDATE"
        );
        assert_eq!(
            POSTGRES.spell("{backoff:t.attempt,6,7}").unwrap(),
            "now() + LEAST($6 << LEAST(GREATEST(t.attempt, 0), 20), $7) * interval '1 millisecond'"
        );
    }

    #[test]
    fn unknown_or_unclosed_tokens_are_errors_not_panics() {
        for dialect in [&POSTGRES, &SQLITE] {
            assert_eq!(dialect.spell("SELECT {nope}").unwrap_err().0, "nope");
            assert!(dialect.spell("SELECT {now").is_err());
            assert!(dialect.spell("SELECT {id:x}").is_err());
            assert!(dialect.spell("SELECT {backoff:a,1}").is_err());
        }
    }
}
