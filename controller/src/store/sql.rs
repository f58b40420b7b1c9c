//! The reconcile statements, written once for both backends.
//!
//! Every statement reads its rows from one JSON array parameter. The only differences between
//! Postgres and SQLite are how that array becomes a relation, how "now" is spelled and how a
//! parameter is named; [`Dialect`] fills those in.

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

/// Each token as (name, Postgres, SQLite). `@` stands for the token's argument, an SQL
/// expression, except in `$@`, where it is a parameter's number.
#[rustfmt::skip]
const TOKENS: &[(&str, &str, &str)] = &[
    ("now", "now()", "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"),
    // A row lock where there is one.
    ("lock", "FOR UPDATE", ""),
    // Lock the rows, passing over those another transaction holds.
    ("skip_locked", "FOR UPDATE SKIP LOCKED", ""),
    // Text parameter N as an id, and as JSON.
    ("id", "CAST(CAST($@ AS text) AS uuid)", "$@"),
    ("json", "CAST($@ AS text)::jsonb", "$@"),
    // The JSON array parameter N as the relation `v(value)`.
    ("values", "jsonb_array_elements_text(CAST($@ AS text)::jsonb) AS v(value)",
        "json_each($@) AS v"),
    // Now plus, and less, parameter N milliseconds.
    ("after", "now() + $@ * interval '1 millisecond'",
        "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', printf('+%.3f seconds', $@ / 1000.0))"),
    ("ago", "now() - $@ * interval '1 millisecond'",
        "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', printf('-%.3f seconds', $@ / 1000.0))"),
    // A timestamp as RFC 3339 text: whole seconds, and to the millisecond as SQLite keeps it.
    ("ts", "to_char(@ AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
        "strftime('%Y-%m-%dT%H:%M:%SZ', @)"),
    ("time", "to_char(@ AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')", "@"),
    // A uuid or JSON column as text.
    ("text", "CAST(@ AS text)", "@"),
    // Seconds, and milliseconds, since a timestamp, as a bigint.
    ("age", "CAST(EXTRACT(EPOCH FROM (now() - @)) AS bigint)",
        "CAST((julianday('now') - julianday(@)) * 86400 AS INTEGER)"),
    ("age_ms", "CAST(EXTRACT(EPOCH FROM (now() - @)) * 1000 AS bigint)",
        "CAST((julianday('now') - julianday(@)) * 86400000 AS INTEGER)"),
    // A JSON array of strings as the relation `d(value)`; `each_n` with the elements'
    // positions as `d.key`.
    ("each", "jsonb_array_elements_text(@) AS d(value)", "json_each(@) AS d"),
    ("each_n", "jsonb_array_elements_text(@) WITH ORDINALITY AS d(value, key)", "json_each(@) AS d"),
    // The parts of `project/task` before and after the slash.
    ("head", "split_part(@, '/', 1)", "substr(@, 1, instr(@, '/') - 1)"),
    ("tail", "split_part(@, '/', 2)", "substr(@, instr(@, '/') + 1)"),
    ("has_table", "to_regclass('@') IS NOT NULL",
        "EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '@')"),
];

/// The column types of `{rows:…}`, as Postgres declares them in `jsonb_to_recordset`.
const TYPES: [(&str, &str); 6] = [
    ("uuid", "uuid"),
    ("text", "text"),
    ("integer", "integer"),
    ("bigint", "bigint"),
    ("boolean", "boolean"),
    ("json", "jsonb"),
];

/// `name type, …` as (name, type) pairs; `None` for a type not in [`TYPES`].
fn columns(declared: &str) -> Option<Vec<(&str, &str)>> {
    declared
        .split(',')
        .map(|column| {
            let (name, ty) = column.trim().split_once(' ')?;
            let ty = ty.trim();
            TYPES.iter().any(|(t, _)| *t == ty).then_some((name, ty))
        })
        .collect()
}

impl Dialect {
    /// Spell a template's tokens and its `$N` parameters the way this backend wants: the
    /// tokens of [`TOKENS`], `{backoff:COL,B,M}` (now plus the wait before the retry that
    /// follows attempt COL: `min(B << min(max(COL, 0), 20), M)` milliseconds, B and M
    /// parameters) and `{rows:COL TYPE,…}` (the JSON array parameter 1 as the relation `r`
    /// of these columns, of the types of [`TYPES`]).
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
        let (name, arg) = token.split_once(':').unwrap_or((token, ""));
        match name {
            "backoff" => {
                let [column, base, max] = arg.split(',').collect::<Vec<_>>()[..] else {
                    return None;
                };
                let (base, max) = (base.parse::<u32>().ok()?, max.parse::<u32>().ok()?);
                let (least, greatest) = self.pick(("LEAST", "GREATEST"), ("min", "max"));
                let ms =
                    format!("{least}(${base} << {least}({greatest}({column}, 0), 20), ${max})");
                Some(self.form("after")?.replace("$@", &ms))
            }
            "rows" => Some(self.rows(&columns(arg)?)),
            _ => {
                let form = self.form(name)?;
                if form.contains("$@") {
                    let number = arg.parse::<u32>().ok()?;
                    Some(form.replace("$@", &format!("${number}")))
                } else {
                    Some(form.replace('@', arg))
                }
            }
        }
    }

    /// How this backend spells token `name`, `@` for its argument.
    fn form(&self, name: &str) -> Option<&'static str> {
        let (_, postgres, sqlite) = TOKENS.iter().find(|(n, _, _)| *n == name)?;
        Some(self.pick(postgres, sqlite))
    }

    /// The JSON array parameter as a relation `r` with the given columns.
    fn rows(&self, columns: &[(&str, &str)]) -> String {
        let spelled: Vec<String> = columns
            .iter()
            .map(|&(name, ty)| match (self.postgres, ty) {
                (true, _) => {
                    let ty = TYPES
                        .iter()
                        .find(|(t, _)| *t == ty)
                        .map_or(ty, |(_, pg)| pg);
                    format!("{name} {ty}")
                }
                // `->` keeps JSON text for JSON columns; `->>` gives the SQL value.
                (false, "json") => format!("value -> '$.{name}' AS {name}"),
                (false, _) => format!("value ->> '$.{name}' AS {name}"),
            })
            .collect();
        if self.postgres {
            format!(
                "jsonb_to_recordset(CAST($1 AS text)::jsonb) AS r({})",
                spelled.join(", ")
            )
        } else {
            format!("(SELECT {} FROM json_each(?1)) AS r", spelled.join(", "))
        }
    }

    /// This backend's own template of a statement whose plan differs between the engines.
    pub fn pick<T>(&self, postgres: T, sqlite: T) -> T {
        if self.postgres { postgres } else { sqlite }
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

/// The columns every reconciled object's row carries, as `{rows:…}` declares them.
const OBJECT: &str = "id uuid, name text, source text, revision text, path text, \
    generation bigint, spec_hash text, metadata json, revive boolean";

/// Columns every reconciled object carries, set from the row.
const OBJECT_SET: &str = "source = r.source, path = r.path, revision = r.revision, \
     generation = r.generation, spec_hash = r.spec_hash, metadata = r.metadata, status_message = NULL";

#[derive(Default)]
pub struct Statements {
    pub insert: String,
    pub update: String,
    pub prune: String,
    pub flag: String,
}

/// The spec's columns of each table, beside the ones every object has.
const PROJECT_COLUMNS: &str = "title text, description text, priority integer, owner text, \
    labels json, suspend boolean";

const TASK_COLUMNS: &str = "project_id uuid, title text, description text, assignee text, \
    priority integer, capabilities json, depends_on json, action json, output json, \
    acceptance_criteria json, timeout_seconds integer, retries integer";

const AGENT_COLUMNS: &str =
    "type text, capabilities json, models json, concurrency integer, instructions text";

const TOOL_COLUMNS: &str = "description text, tool_type text, created_by text, implementation json";

fn unspellable(declared: &str) -> Unspellable {
    Unspellable(format!("rows:{declared}"))
}

/// The spec's columns and `metadata` of the rows whose ids the JSON array names, each row as
/// one JSON object (`id`, `fields`) shaped like the rows a sync writes.
fn fields(d: &Dialect, table: &str, declared: &str) -> Result<String, Unspellable> {
    let columns = columns(declared).ok_or_else(|| unspellable(declared))?;
    let pairs: Vec<String> = columns
        .into_iter()
        .filter(|(name, _)| *name != "project_id")
        .chain([("metadata", "json")])
        .map(|(name, ty)| {
            let value = match (d.postgres, ty) {
                (false, "json") => format!("json(x.{name})"),
                // SQLite keeps booleans as 0 and 1.
                (false, "boolean") => {
                    format!("CASE WHEN x.{name} THEN json('true') ELSE json('false') END")
                }
                _ => format!("x.{name}"),
            };
            format!("'{name}', {value}")
        })
        .collect();
    let object = d.pick(
        format!("CAST(jsonb_build_object({}) AS text)", pairs.join(", ")),
        format!("json_object({})", pairs.join(", ")),
    );
    d.spell(&format!(
        "SELECT CAST(x.id AS text) AS id, {object} AS fields FROM {table} x \
         WHERE x.id IN (SELECT r.id FROM {{rows:id uuid}})"
    ))
}

fn project(d: &Dialect) -> Result<Statements, Unspellable> {
    let prune = "status = CASE WHEN projects.status = 'completed' THEN projects.status \
        ELSE 'cancelled' END";
    let writes = Statements {
        insert: format!(
            "INSERT INTO projects (id, name, title, description, priority, owner, labels, suspend, \
             source, path, revision, generation, spec_hash, metadata) \
             SELECT r.id, r.name, r.title, r.description, r.priority, r.owner, r.labels, r.suspend, \
             r.source, r.path, r.revision, r.generation, r.spec_hash, r.metadata \
             FROM {{rows:{OBJECT}, {PROJECT_COLUMNS}}}"
        ),
        update: format!(
            "UPDATE projects SET title = r.title, description = r.description, \
             priority = r.priority, owner = r.owner, labels = r.labels, suspend = r.suspend, \
             {OBJECT_SET}, \
             status = CASE WHEN r.revive THEN 'active' ELSE projects.status END, \
             completed_at = CASE WHEN r.revive THEN NULL ELSE projects.completed_at END, \
             pruned_at = CASE WHEN r.revive THEN NULL ELSE projects.pruned_at END \
             FROM {{rows:{OBJECT}, {PROJECT_COLUMNS}}} WHERE projects.id = r.id"
        ),
        ..Statements::default()
    };
    keyed(d, "projects", "id uuid", prune, writes)
}

fn task(d: &Dialect) -> Result<Statements, Unspellable> {
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
    let writes = Statements {
        insert: format!(
            "INSERT INTO tasks (id, project_id, name, title, description, assigned_to, assignee, \
             priority, capabilities, depends_on, action, output, acceptance_criteria, \
             timeout_seconds, retries, source, path, revision, generation, spec_hash, metadata) \
             SELECT r.id, r.project_id, r.name, r.title, r.description, r.assignee, r.assignee, \
             r.priority, r.capabilities, r.depends_on, r.action, r.output, r.acceptance_criteria, \
             r.timeout_seconds, r.retries, r.source, r.path, r.revision, r.generation, \
             r.spec_hash, r.metadata FROM {{rows:{OBJECT}, {TASK_COLUMNS}}}"
        ),
        update: format!(
            "UPDATE tasks SET project_id = r.project_id, title = r.title, \
             description = r.description, assignee = r.assignee, \
             assigned_to = CASE WHEN r.revive OR tasks.status = 'pending' \
                 THEN r.assignee ELSE tasks.assigned_to END, \
             priority = r.priority, capabilities = r.capabilities, depends_on = r.depends_on, \
             action = r.action, output = r.output, acceptance_criteria = r.acceptance_criteria, \
             timeout_seconds = r.timeout_seconds, retries = r.retries, {OBJECT_SET}, {resets} \
             FROM {{rows:{OBJECT}, {TASK_COLUMNS}}} WHERE tasks.id = r.id"
        ),
        ..Statements::default()
    };
    keyed(d, "tasks", "id uuid", prune, writes)
}

// Agents and tools are unique by name and may already exist (the seeded `cos` and `seed`, or
// one registered through the API), so declaring one adopts the row: an upsert serves as both
// insert and update.
fn agent(d: &Dialect) -> Result<Statements, Unspellable> {
    let revive = "status = CASE WHEN agents.pruned_at IS NULL THEN agents.status \
        ELSE 'offline' END, ";
    let upsert = upsert("agents", AGENT_COLUMNS, revive)?;
    keyed(d, "agents", "name text", "status = 'offline'", upsert)
}

fn tool(d: &Dialect) -> Result<Statements, Unspellable> {
    keyed(
        d,
        "tools",
        "name text",
        "",
        upsert("tools", TOOL_COLUMNS, "")?,
    )
}

/// Insert or adopt by name, setting `revive` too.
fn upsert(table: &str, declared: &str, revive: &str) -> Result<Statements, Unspellable> {
    let columns = columns(declared).ok_or_else(|| unspellable(declared))?;
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
    let upsert = format!(
        "INSERT INTO {table} ({}) SELECT {} FROM {{rows:{OBJECT}, {declared}}} WHERE true \
         ON CONFLICT (name) DO UPDATE SET {}, status_message = NULL, {revive}pruned_at = NULL",
        all.join(", "),
        picked.join(", "),
        excluded.join(", ")
    );
    Ok(Statements {
        insert: upsert.clone(),
        update: upsert,
        ..Statements::default()
    })
}

/// A table's statements, spelled, with the prune (which also sets `prune`) and the flag of the
/// rows found by `key` (`name type`).
fn keyed(
    d: &Dialect,
    table: &str,
    key: &str,
    prune: &str,
    writes: Statements,
) -> Result<Statements, Unspellable> {
    let prune = if prune.is_empty() {
        String::new()
    } else {
        format!(", {prune}")
    };
    let name = key.split(' ').next().unwrap_or(key);
    let by_key = format!("WHERE {table}.{name} = r.{name}");
    Ok(Statements {
        insert: d.spell(&writes.insert)?,
        update: d.spell(&writes.update)?,
        prune: d.spell(&format!(
            "UPDATE {table} SET pruned_at = {{now}}{prune} FROM {{rows:{key}}} {by_key}"
        ))?,
        flag: d.spell(&format!(
            "UPDATE {table} SET status_message = r.message \
             FROM {{rows:{key}, message text}} {by_key}"
        ))?,
    })
}

/// Rendered once per process and dialect, when the first store connects; `&'static` so sqlx
/// accepts them as audited SQL (they are built from this crate's constants only).
static SQL: [std::sync::LazyLock<Result<Sql, Unspellable>>; 2] = [
    std::sync::LazyLock::new(|| Sql::new(&SQLITE)),
    std::sync::LazyLock::new(|| Sql::new(&POSTGRES)),
];

/// Every statement of the store for one backend, rendered once.
pub struct Sql {
    pub projects: Statements,
    pub tasks: Statements,
    pub agents: Statements,
    pub tools: Statements,
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
        /// The events of a plan.
        events = "INSERT INTO events (id, event_type, source_agent, payload) \
            SELECT r.id, r.event_type, 'controller', r.payload \
            FROM {rows:id uuid,event_type text,payload json}",
        /// Events from a JSON array of `{type, agent, payload}`.
        add_events = "INSERT INTO events (event_type, source_agent, payload) \
            SELECT r.type, r.agent, r.payload FROM {rows:type text,agent text,payload json}",
    }
}

impl Sql {
    pub fn new(d: &Dialect) -> Result<Sql, Unspellable> {
        Ok(Sql {
            projects: project(d)?,
            tasks: task(d)?,
            agents: agent(d)?,
            tools: tool(d)?,
            fields: [
                ("projects", fields(d, "projects", PROJECT_COLUMNS)?),
                ("tasks", fields(d, "tasks", TASK_COLUMNS)?),
                ("agents", fields(d, "agents", AGENT_COLUMNS)?),
                ("tools", fields(d, "tools", TOOL_COLUMNS)?),
            ],
            core: Core::new(d)?,
            writeback: super::writeback::Statements::new(d)?,
            registry: super::tools::Statements::new(d)?,
            usage: super::usage::Statements::new(d)?,
            queue: super::queue_db::Statements::new(d)?,
        })
    }

    /// The statements of dialect `d`.
    pub fn of(d: &Dialect) -> &'static Result<Sql, Unspellable> {
        &SQL[usize::from(d.postgres)]
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
        let mut all = Vec::new();
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
        for dialect in [&POSTGRES, &SQLITE] {
            let sql = Sql::of(dialect).as_ref().expect("every template spells");
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
