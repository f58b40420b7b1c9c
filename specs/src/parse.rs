//! Reading one YAML file into [`Object`]s, with every problem reported as
//! `path:line:column: message`.
//!
//! A file is read in two passes. The first reads only each document's `apiVersion` and `kind`,
//! tolerating anything else, so that files (and documents) of other tools are ignored rather
//! than reported. The second reads the documents that are ours with the strict, typed shape of
//! their kind, so that unknown fields and wrong types are errors at their own position. Each
//! document of the second pass is read on its own: the first problem of one document is
//! reported and the next document is still read. YAML that cannot be read at all (syntax, size,
//! encoding, alias bombs, nesting) gives one error for the file, and only when a line of it
//! names our `apiVersion`.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeOwned, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_saphyr::{MessageFormatter, Spanned};

use crate::diagnostic::Diagnostic;
use crate::model::*;
use crate::names;

/// Larger files are refused before they are parsed.
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// Deeper nesting than any real spec needs; refusing it keeps hostile input cheap.
pub const MAX_DEPTH: usize = 64;

/// What one file declared. `errors` empty means the file is good; a file with any error is
/// treated as bad as a whole by the reconciler, so that a half-read file never half-applies.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedFile {
    pub objects: Vec<Object>,
    pub errors: Vec<Diagnostic>,
    /// False when no document of the file has our apiVersion group: the file is someone
    /// else's and is ignored.
    pub ours: bool,
}

impl ParsedFile {
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Parse one file. `path` is relative to the synced root, with `/` separators; it is used in
/// diagnostics and to infer a task's project from `projects/<p>/tasks/`.
pub fn parse_file(path: &str, bytes: &[u8]) -> ParsedFile {
    let mentions_us = mentions_us(bytes);
    let fail = |pos: Pos, message: String| ParsedFile {
        objects: Vec::new(),
        errors: vec![Diagnostic::new(path, pos, message)],
        ours: true,
    };

    if bytes.len() > MAX_FILE_BYTES {
        if !mentions_us {
            return ParsedFile::default();
        }
        return fail(
            Pos::START,
            format!(
                "file is {} bytes; the limit is {MAX_FILE_BYTES} bytes (1 MiB)",
                bytes.len()
            ),
        );
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) if mentions_us => {
            let pos = pos_of_byte(bytes, e.valid_up_to());
            return fail(pos, "file is not valid UTF-8".to_owned());
        }
        Err(_) => return ParsedFile::default(),
    };

    single_document_fast_path(path, text).unwrap_or_else(|| parse_text(path, text, mentions_us))
}

/// The general path: any number of documents, ours or not, in any YAML style.
fn parse_text(path: &str, text: &str, mentions_us: bool) -> ParsedFile {
    let fail = |pos: Pos, message: String| ParsedFile {
        objects: Vec::new(),
        errors: vec![Diagnostic::new(path, pos, message)],
        ours: true,
    };
    let envelopes = match saphyr_multi::<Spanned<Envelope>>(text) {
        Ok(envelopes) => envelopes,
        Err(d) if mentions_us => return fail(d.0, d.1),
        Err(_) => return ParsedFile::default(),
    };

    let mut file = ParsedFile::default();
    let mut plan = VecDeque::with_capacity(envelopes.len());
    for env in &envelopes {
        plan.push_back(classify(path, env, &mut file.errors));
    }
    file.ours = !file.errors.is_empty() || plan.iter().any(Option::is_some);
    if !file.ours {
        return file;
    }

    let expected = plan.len();
    let docs = DOC_PLAN.with(|p| {
        *p.borrow_mut() = plan;
        let docs = saphyr_each::<AnyDoc>(text);
        p.borrow_mut().clear();
        docs
    });
    if docs.len() != expected {
        file.errors.push(Diagnostic::new(
            path,
            Pos::START,
            format!(
                "internal error: read {} documents, then {}",
                expected,
                docs.len()
            ),
        ));
        return file;
    }

    for (doc, env) in docs.into_iter().zip(&envelopes) {
        let at = pos_of(&env.referenced);
        let object = match doc {
            Err((pos, message)) => {
                file.errors.push(Diagnostic::new(path, pos, message));
                continue;
            }
            Ok(AnyDoc::Skip) => continue,
            Ok(AnyDoc::Project(d)) => finish_project(path, at, *d, &mut file.errors),
            Ok(AnyDoc::Agent(d)) => finish_agent(path, at, *d, &mut file.errors),
            Ok(AnyDoc::Tool(d)) => finish_tool(path, at, *d, &mut file.errors),
            Ok(AnyDoc::Task(d)) => finish_task(path, at, *d, &mut file.errors),
        };
        if let Some(object) = object {
            file.objects.push(object);
        }
    }
    file
}

/// Most spec files hold one block-style document that starts with its `apiVersion` and
/// `kind` lines. For those, the envelope pass can be read off the lines, and the file parsed
/// once instead of twice, which halves the cost of a cold sync. Anything unusual (several
/// documents, flow style, quoting, an error) returns `None` and takes the general path, so
/// the result, errors included, is always the general path's.
fn single_document_fast_path(path: &str, text: &str) -> Option<ParsedFile> {
    let mut api_version = None;
    let mut kind = None;
    let mut first_content = None;
    for (n, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.starts_with("---") || line.starts_with("...") || line.contains('\r') {
            return None;
        }
        let content = line.trim_start();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        if first_content.is_none() {
            if !line.starts_with(|c: char| c.is_ascii_alphabetic()) {
                return None;
            }
            first_content = Some(n);
        }
        let value = |key: &str| {
            line.strip_prefix(key)
                .map(|rest| rest.split(" #").next().unwrap_or_default().trim())
        };
        if let Some(v) = value("apiVersion:") {
            if api_version.replace(v).is_some() {
                return None;
            }
        } else if let Some(v) = value("kind:")
            && kind.replace(v).is_some()
        {
            return None;
        }
    }
    if api_version? != API_VERSION {
        return None;
    }
    let kind = Kind::parse(kind?)?;
    let at = Pos {
        line: u32::try_from(first_content? + 1).ok()?,
        column: 1,
    };
    let doc = DOC_PLAN.with(|p| {
        *p.borrow_mut() = VecDeque::from([Some(kind)]);
        let doc = serde_saphyr::from_str_with_options::<AnyDoc>(text, options());
        p.borrow_mut().clear();
        doc
    });
    let mut errors = Vec::new();
    let object = match doc.ok()? {
        AnyDoc::Skip => return None,
        AnyDoc::Project(d) => finish_project(path, at, *d, &mut errors),
        AnyDoc::Agent(d) => finish_agent(path, at, *d, &mut errors),
        AnyDoc::Tool(d) => finish_tool(path, at, *d, &mut errors),
        AnyDoc::Task(d) => finish_task(path, at, *d, &mut errors),
    };
    if !errors.is_empty() {
        return None;
    }
    Some(ParsedFile {
        objects: vec![object?],
        errors,
        ours: true,
    })
}

fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        with_snippet: false,
        budget: serde_saphyr::budget! {
            max_depth: MAX_DEPTH,
            // The scanner's own limit on `[` and `{` nesting; without it a deeply nested flow
            // collection is refused only at depth 255, far from where it went too deep.
            flow_nesting_limit: MAX_DEPTH,
            max_documents: 10_000,
            max_aliases: 1_000,
            max_anchors: 1_000,
            max_nodes: 200_000,
            max_recorded_anchor_events: 20_000,
            max_recorded_anchor_bytes: 4 << 20,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: 20_000,
            max_alias_expansions_per_anchor: 100,
        },
    }
}

/// Deserialize every document, turning a failure into the position and message to report.
fn saphyr_multi<T: DeserializeOwned>(text: &str) -> Result<Vec<T>, (Pos, String)> {
    serde_saphyr::from_multiple_with_options::<T>(text, options()).map_err(|e| report(text, &e))
}

/// Deserialize every document on its own: a document that fails gives its error and the next
/// documents are still read, so one run reports the problems of every document in the file.
fn saphyr_each<T: DeserializeOwned>(text: &str) -> Vec<Result<T, (Pos, String)>> {
    let mut reader = text.as_bytes();
    serde_saphyr::read_with_options::<_, T>(&mut reader, options())
        .map(|r| r.map_err(|e| report(text, &e)))
        .collect()
}

/// The position and message to report for a YAML error.
fn report(text: &str, e: &serde_saphyr::Error) -> (Pos, String) {
    let pos = e.location().map_or(Pos::START, |l| pos_of(&l));
    let message = describe(e);
    const TAB_ERRORS: [&str; 4] = [
        "found a tab",
        "tabs disallowed",
        "tab cannot be used",
        "cannot start with a tab",
    ];
    let pos = if TAB_ERRORS.iter().any(|t| message.contains(t)) {
        tab_near(text, pos).unwrap_or(pos)
    } else {
        pos
    };
    (pos, message)
}

/// Messages for the YAML errors whose default wording speaks to a programmer (budgets, options)
/// rather than to the person who wrote the file.
fn describe(e: &serde_saphyr::Error) -> String {
    use serde_saphyr::Error as E;
    use serde_saphyr::budget::BudgetBreach as B;
    match e {
        E::WithSnippet { error, .. } => describe(error),
        #[allow(deprecated, reason = "only the original error is read")]
        E::AliasError { error, .. } => describe(error),
        E::DuplicateMappingKey { key: Some(key), .. } => format!("duplicate key `{key}`"),
        E::DuplicateMappingKey { key: None, .. } => "duplicate key".to_owned(),
        E::Unexpected { expected, .. } => match *expected {
            "sequence start" => "expected a list".to_owned(),
            "mapping start" => "expected a mapping".to_owned(),
            "string scalar" | "scalar" => {
                "expected a single value, not a list or mapping".to_owned()
            }
            other => format!("expected {other}"),
        },
        E::InvalidScalar { ty, .. } => match *ty {
            "bool" | "boolean" => "expected true or false".to_owned(),
            "i8" | "i16" | "i32" | "i64" | "i128" | "u8" | "u16" | "u32" | "u64" | "u128"
            | "isize" | "usize" => "expected a whole number".to_owned(),
            "f32" | "f64" | "floating point" => "expected a number".to_owned(),
            other => format!("invalid {other}"),
        },
        E::Budget { breach, .. } => match breach {
            B::Depth { .. } => format!("nesting is deeper than {MAX_DEPTH} levels"),
            B::Aliases { .. }
            | B::Anchors { .. }
            | B::AliasAnchorRatio { .. }
            | B::RecordedAnchorEvents { .. }
            | B::RecordedAnchorBytes { .. }
            | B::MergeKeys { .. } => ALIAS_BOMB.to_owned(),
            other => format!("the file is too large or too complex to read safely ({other:?})"),
        },
        E::AliasReplayCounterOverflow { .. }
        | E::AliasReplayLimitExceeded { .. }
        | E::AliasExpansionLimitExceeded { .. }
        | E::AliasReplayStackDepthExceeded { .. } => ALIAS_BOMB.to_owned(),
        _ => {
            let message = serde_saphyr::DefaultMessageFormatter
                .format_message(e)
                .into_owned();
            if message.contains("recursion limit exceeded") {
                format!("nesting is deeper than {MAX_DEPTH} levels")
            } else {
                message
            }
        }
    }
}

const ALIAS_BOMB: &str = "anchors and aliases expand into too much data; refusing to read the file (limits: 1000 anchors, 1000 aliases, 20000 expanded nodes)";

/// The first tab on the line of `pos`, or else on the next line: YAML's tab errors point at the
/// scalar or the column the tab breaks rather than at the tab itself.
fn tab_near(text: &str, pos: Pos) -> Option<Pos> {
    yaml_lines(text)
        .enumerate()
        .skip(pos.line as usize - 1)
        .take(2)
        .find_map(|(i, line)| {
            let col = line.find('\t')?;
            Some(Pos {
                line: i as u32 + 1,
                column: line[..col].chars().count() as u32 + 1,
            })
        })
}

/// The lines of a text as YAML counts them: ended by `\n`, `\r\n` or a lone `\r`.
fn yaml_lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let s = rest?;
        match s.find(['\n', '\r']) {
            None => {
                rest = None;
                Some(s)
            }
            Some(i) => {
                let next = if s[i..].starts_with("\r\n") {
                    i + 2
                } else {
                    i + 1
                };
                rest = Some(&s[next..]);
                Some(&s[..i])
            }
        }
    })
}

fn pos_of(loc: &serde_saphyr::Location) -> Pos {
    Pos {
        line: loc.line().max(1) as u32,
        column: loc.column().max(1) as u32,
    }
}

fn pos_of_byte(bytes: &[u8], offset: usize) -> Pos {
    let before = &bytes[..offset];
    // Lines end as YAML ends them: `\n`, `\r\n` or a lone `\r`.
    let breaks = before
        .iter()
        .enumerate()
        .filter(|&(i, b)| *b == b'\n' || (*b == b'\r' && before.get(i + 1) != Some(&b'\n')))
        .count();
    let line_start = before
        .iter()
        .rposition(|b| *b == b'\n' || *b == b'\r')
        .map_or(0, |i| i + 1);
    // Column counts characters, matching the YAML parser's columns on the same line.
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    Pos {
        line: breaks as u32 + 1,
        column: column as u32,
    }
}

/// Whether a file says it holds our resources: a line naming `apiVersion` and then our group.
/// Only a file that does gets its unreadable YAML (or size, or encoding) reported; a Helm
/// template or a Role that merely mentions `agentops.dev` is someone else's.
fn mentions_us(bytes: &[u8]) -> bool {
    bytes.split(|b| *b == b'\n' || *b == b'\r').any(|line| {
        find(line, b"apiVersion").is_some_and(|i| find(&line[i..], API_GROUP.as_bytes()).is_some())
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Decide from the envelope how the second pass reads a document: `None` skips it.
fn classify(path: &str, env: &Spanned<Envelope>, errors: &mut Vec<Diagnostic>) -> Option<Kind> {
    let env_pos = pos_of(&env.referenced);
    let (api_version, api_pos) = env.value.api_version.as_ref()?;
    let group = api_version.split('/').next().unwrap_or_default();
    if group != API_GROUP {
        return None;
    }
    if api_version != API_VERSION {
        errors.push(Diagnostic::new(
            path,
            *api_pos,
            format!("unsupported apiVersion `{api_version}`: this version of agentops reads {API_VERSION}"),
        ));
        return None;
    }
    let known = Kind::ALL.map(Kind::as_str).join(", ");
    match &env.value.kind {
        None => {
            errors.push(Diagnostic::new(
                path,
                env_pos,
                format!("missing field `kind`: expected one of {known}"),
            ));
            None
        }
        Some((kind, kind_pos)) => match Kind::parse(kind) {
            Some(kind) => Some(kind),
            None => {
                errors.push(Diagnostic::new(
                    path,
                    *kind_pos,
                    format!("unknown kind `{kind}`: expected one of {known}"),
                ));
                None
            }
        },
    }
}

/// The first pass: `apiVersion` and `kind` of any document, whatever else it holds.
#[derive(Debug, Default)]
struct Envelope {
    api_version: Option<(String, Pos)>,
    kind: Option<(String, Pos)>,
}

impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(EnvelopeVisitor)
    }
}

struct EnvelopeVisitor;

impl<'de> Visitor<'de> for EnvelopeVisitor {
    type Value = Envelope;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML document")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope, A::Error> {
        let mut env = Envelope::default();
        while let Some(key) = map.next_key::<EnvelopeKey>()? {
            let value = map.next_value::<Spanned<ScalarText>>()?;
            let slot = match key {
                EnvelopeKey::ApiVersion => &mut env.api_version,
                EnvelopeKey::Kind => &mut env.kind,
                EnvelopeKey::Other => continue,
            };
            if let Some(text) = value.value.0 {
                *slot = Some((text, pos_of(&value.referenced)));
            }
        }
        Ok(env)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Envelope, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Envelope::default())
    }

    fn visit_bool<E>(self, _: bool) -> Result<Envelope, E> {
        Ok(Envelope::default())
    }
    fn visit_i64<E>(self, _: i64) -> Result<Envelope, E> {
        Ok(Envelope::default())
    }
    fn visit_u64<E>(self, _: u64) -> Result<Envelope, E> {
        Ok(Envelope::default())
    }
    fn visit_f64<E>(self, _: f64) -> Result<Envelope, E> {
        Ok(Envelope::default())
    }
    fn visit_str<E>(self, _: &str) -> Result<Envelope, E> {
        Ok(Envelope::default())
    }
    fn visit_bytes<E>(self, _: &[u8]) -> Result<Envelope, E> {
        Ok(Envelope::default())
    }
    fn visit_unit<E>(self) -> Result<Envelope, E> {
        Ok(Envelope::default())
    }
    fn visit_none<E>(self) -> Result<Envelope, E> {
        Ok(Envelope::default())
    }
}

enum EnvelopeKey {
    ApiVersion,
    Kind,
    Other,
}

impl<'de> Deserialize<'de> for EnvelopeKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = d.deserialize_any(ScalarTextVisitor)?;
        Ok(match text.0.as_deref() {
            Some("apiVersion") => EnvelopeKey::ApiVersion,
            Some("kind") => EnvelopeKey::Kind,
            _ => EnvelopeKey::Other,
        })
    }
}

/// A value's text when it is a string; any other value is consumed and gives `None`.
struct ScalarText(Option<String>);

impl<'de> Deserialize<'de> for ScalarText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarTextVisitor)
    }
}

struct ScalarTextVisitor;

impl<'de> Visitor<'de> for ScalarTextVisitor {
    type Value = ScalarText;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any value")
    }
    fn visit_str<E>(self, v: &str) -> Result<ScalarText, E> {
        Ok(ScalarText(Some(v.to_owned())))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ScalarText, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(ScalarText(None))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<ScalarText, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(ScalarText(None))
    }
    fn visit_bool<E>(self, _: bool) -> Result<ScalarText, E> {
        Ok(ScalarText(None))
    }
    fn visit_i64<E>(self, _: i64) -> Result<ScalarText, E> {
        Ok(ScalarText(None))
    }
    fn visit_u64<E>(self, _: u64) -> Result<ScalarText, E> {
        Ok(ScalarText(None))
    }
    fn visit_f64<E>(self, _: f64) -> Result<ScalarText, E> {
        Ok(ScalarText(None))
    }
    fn visit_bytes<E>(self, _: &[u8]) -> Result<ScalarText, E> {
        Ok(ScalarText(None))
    }
    fn visit_unit<E>(self) -> Result<ScalarText, E> {
        Ok(ScalarText(None))
    }
    fn visit_none<E>(self) -> Result<ScalarText, E> {
        Ok(ScalarText(None))
    }
}

thread_local! {
    /// The first pass's verdict for each document, consumed in order by the second pass.
    /// serde-saphyr hands documents to `Deserialize` one after another and offers no seed, so
    /// this is how a document learns which typed shape to read itself as.
    static DOC_PLAN: RefCell<VecDeque<Option<Kind>>> = const { RefCell::new(VecDeque::new()) };
}

/// The second pass: one document, read with the strict shape of its kind.
enum AnyDoc {
    Skip,
    Project(Box<RawDoc<RawProjectSpec>>),
    Task(Box<RawDoc<RawTaskSpec>>),
    Agent(Box<RawDoc<RawAgentSpec>>),
    Tool(Box<RawDoc<RawToolSpec>>),
}

impl<'de> Deserialize<'de> for AnyDoc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let kind = DOC_PLAN.with(|p| p.borrow_mut().pop_front()).flatten();
        Ok(match kind {
            None => {
                IgnoredAny::deserialize(d)?;
                AnyDoc::Skip
            }
            Some(Kind::Project) => AnyDoc::Project(Box::deserialize(d)?),
            Some(Kind::Task) => AnyDoc::Task(Box::deserialize(d)?),
            Some(Kind::Agent) => AnyDoc::Agent(Box::deserialize(d)?),
            Some(Kind::Tool) => AnyDoc::Tool(Box::deserialize(d)?),
        })
    }
}

/// A mapping entry: where its key is, and its value with the value's position.
struct Entry<T> {
    key: Pos,
    value: Spanned<T>,
}

/// A document of ours. Read by hand rather than derived so that the positions of the
/// `metadata` and `spec` keys are known: a field missing from either is reported there.
struct RawDoc<S> {
    metadata: Option<Entry<Option<RawMeta>>>,
    spec: Option<Entry<Option<S>>>,
}

const DOC_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec"];

impl<'de, S: Deserialize<'de>> Deserialize<'de> for RawDoc<S> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct DocVisitor<S>(PhantomData<S>);

        impl<'de, S: Deserialize<'de>> Visitor<'de> for DocVisitor<S> {
            type Value = RawDoc<S>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping of apiVersion, kind, metadata and spec")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawDoc<S>, A::Error> {
                let mut doc = RawDoc {
                    metadata: None,
                    spec: None,
                };
                while let Some(key) = map.next_key::<Spanned<String>>()? {
                    let at = pos_of(&key.referenced);
                    match key.value.as_str() {
                        "apiVersion" | "kind" => {
                            map.next_value::<IgnoredAny>()?;
                        }
                        "metadata" => {
                            doc.metadata = Some(Entry {
                                key: at,
                                value: map.next_value()?,
                            });
                        }
                        "spec" => {
                            doc.spec = Some(Entry {
                                key: at,
                                value: map.next_value()?,
                            });
                        }
                        other => return Err(de::Error::unknown_field(other, DOC_FIELDS)),
                    }
                }
                Ok(doc)
            }
        }

        d.deserialize_map(DocVisitor(PhantomData))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMeta {
    #[serde(default)]
    name: Option<Spanned<String>>,
    /// Accepted so that the same file can be applied as a custom resource; not used.
    #[serde(default)]
    #[allow(dead_code, reason = "accepted for custom resources, not used")]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// [`ProjectSpec`] with the positions that checks point at.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawProjectSpec {
    #[serde(default)]
    title: Option<Spanned<String>>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    priority: Priority,
    #[serde(default)]
    owner: Option<Spanned<String>>,
    #[serde(default)]
    suspend: bool,
}

/// [`AgentSpec`] with the positions that checks point at.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawAgentSpec {
    #[serde(default, rename = "type")]
    agent_type: Option<AgentType>,
    #[serde(default)]
    capabilities: Vec<Spanned<String>>,
    #[serde(default)]
    models: Vec<Spanned<String>>,
    #[serde(default)]
    concurrency: Option<Spanned<i64>>,
    #[serde(default)]
    instructions: String,
}

/// [`ToolSpec`] with the positions that checks point at.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawToolSpec {
    #[serde(default, rename = "type")]
    tool_type: Option<Spanned<ToolType>>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    created_by: Option<Spanned<String>>,
}

/// [`TaskSpec`] with the positions that checks and validation point at.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawTaskSpec {
    #[serde(default)]
    project: Option<Spanned<String>>,
    #[serde(default)]
    title: Option<Spanned<String>>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    assignee: Option<Spanned<String>>,
    #[serde(default)]
    capabilities: Vec<Spanned<String>>,
    #[serde(default)]
    priority: Priority,
    #[serde(default)]
    depends_on: Vec<Spanned<String>>,
    #[serde(default)]
    action: Option<Spanned<RawAction>>,
    #[serde(default)]
    output: Option<RawOutput>,
    #[serde(default)]
    timeout: Option<HumanDuration>,
    #[serde(default)]
    retries: Option<Spanned<i64>>,
    #[serde(default)]
    acceptance_criteria: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    #[serde(default)]
    prompt: Option<Spanned<String>>,
    #[serde(default)]
    run: Option<Spanned<RunAction>>,
    #[serde(default)]
    tool: Option<Spanned<RawToolAction>>,
    /// `plan: {}` and a bare `plan:` both ask for planning, so presence is what counts.
    #[serde(default, deserialize_with = "present")]
    plan: Option<Spanned<Option<PlanAction>>>,
}

fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToolAction {
    #[serde(default)]
    name: Option<Spanned<String>>,
    #[serde(default)]
    with: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    #[serde(default)]
    mode: OutputMode,
    #[serde(default)]
    paths: Vec<Spanned<String>>,
}

/// Retries above this are almost certainly a typo, and would keep a broken task spinning.
pub const MAX_RETRIES: u32 = 100;
pub const MAX_CONCURRENCY: u32 = 1_000;

fn check_name(path: &str, pos: Pos, what: &str, name: &str, errors: &mut Vec<Diagnostic>) -> bool {
    match names::check_dns_label(name) {
        Ok(()) => true,
        Err(why) => {
            errors.push(Diagnostic::new(
                path,
                pos,
                format!("invalid {what} `{name}`: {why}"),
            ));
            false
        }
    }
}

/// A required text field: reported at `at` (the key of the mapping that lacks it) when missing,
/// at the value when blank.
fn required_text(
    path: &str,
    at: Pos,
    field: &str,
    value: Option<Spanned<String>>,
    errors: &mut Vec<Diagnostic>,
) -> String {
    match value {
        None => {
            errors.push(Diagnostic::new(
                path,
                at,
                format!("missing field `{field}`"),
            ));
            String::new()
        }
        Some(v) => {
            if v.value.trim().is_empty() {
                errors.push(Diagnostic::new(
                    path,
                    pos_of(&v.referenced),
                    format!("{field} must not be empty"),
                ));
            }
            v.value
        }
    }
}

/// An optional whole number in `min..=max`, reported at its value when outside.
fn bounded(
    path: &str,
    field: &str,
    value: Option<Spanned<i64>>,
    (min, max, default): (u32, u32, u32),
    errors: &mut Vec<Diagnostic>,
) -> u32 {
    let Some(v) = value else {
        return default;
    };
    match u32::try_from(v.value) {
        Ok(n) if (min..=max).contains(&n) => n,
        _ => {
            errors.push(Diagnostic::new(
                path,
                pos_of(&v.referenced),
                format!(
                    "{field} {} is out of range: must be {min} to {max}",
                    v.value
                ),
            ));
            default
        }
    }
}

/// The metadata with the name's position, and the spec with its key's position; `None` for
/// either when it is missing or unusable (and reported).
type Header<S> = (Option<(ObjectMeta, Pos)>, Option<(S, Pos)>);

/// The metadata and spec of a document, each reported where it is missing or empty.
fn header<S>(
    path: &str,
    at: Pos,
    kind: Kind,
    doc: RawDoc<S>,
    errors: &mut Vec<Diagnostic>,
) -> Header<S> {
    let metadata = match doc.metadata {
        None => {
            errors.push(Diagnostic::new(path, at, "missing field `metadata`"));
            None
        }
        Some(Entry { key, value }) => match value.value {
            None => {
                errors.push(Diagnostic::new(
                    path,
                    key,
                    "metadata is empty: it needs at least a `name`",
                ));
                None
            }
            Some(raw) => match raw.name {
                None => {
                    errors.push(Diagnostic::new(path, key, "missing field `metadata.name`"));
                    None
                }
                Some(name) => {
                    let pos = pos_of(&name.referenced);
                    check_name(path, pos, "name", &name.value, errors).then_some({
                        (
                            ObjectMeta {
                                name: name.value,
                                labels: raw.labels,
                                annotations: raw.annotations,
                            },
                            pos,
                        )
                    })
                }
            },
        },
    };
    let spec = match doc.spec {
        None => {
            errors.push(Diagnostic::new(path, at, "missing field `spec`"));
            None
        }
        Some(Entry { key, value }) => match value.value {
            None => {
                errors.push(Diagnostic::new(
                    path,
                    key,
                    format!("spec is empty: a {kind} needs its fields here"),
                ));
                None
            }
            Some(spec) => Some((spec, key)),
        },
    };
    (metadata, spec)
}

fn object(metadata: ObjectMeta, name: Pos, spec: Spec, path: &str, at: Pos) -> Object {
    Object {
        metadata,
        spec,
        origin: Origin {
            path: path.to_owned(),
            document: at,
            name,
            project: at,
            depends_on: Vec::new(),
            action: at,
        },
    }
}

fn finish_project(
    path: &str,
    at: Pos,
    doc: RawDoc<RawProjectSpec>,
    errors: &mut Vec<Diagnostic>,
) -> Option<Object> {
    let before = errors.len();
    let (meta, spec) = header(path, at, Kind::Project, doc, errors);
    let (raw, spec_key) = spec?;
    let title = required_text(path, spec_key, "spec.title", raw.title, errors);
    let owner = raw.owner.map(|o| {
        check_name(path, pos_of(&o.referenced), "owner", &o.value, errors);
        o.value
    });
    let (metadata, name) = meta?;
    let spec = Spec::Project(ProjectSpec {
        title,
        description: raw.description,
        priority: raw.priority,
        owner,
        suspend: raw.suspend,
    });
    (errors.len() == before).then(|| object(metadata, name, spec, path, at))
}

fn finish_agent(
    path: &str,
    at: Pos,
    doc: RawDoc<RawAgentSpec>,
    errors: &mut Vec<Diagnostic>,
) -> Option<Object> {
    let before = errors.len();
    let (meta, spec) = header(path, at, Kind::Agent, doc, errors);
    let (raw, spec_key) = spec?;
    let agent_type = raw.agent_type;
    if agent_type.is_none() {
        errors.push(Diagnostic::new(
            path,
            spec_key,
            "missing field `spec.type`: expected one of cos, seed, specialist, meta",
        ));
    }
    let capabilities = non_empty(path, "capability", raw.capabilities, errors);
    let models = non_empty(path, "model", raw.models, errors);
    let concurrency = bounded(
        path,
        "concurrency",
        raw.concurrency,
        (1, MAX_CONCURRENCY, default_concurrency()),
        errors,
    );
    let (metadata, name) = meta?;
    let spec = Spec::Agent(AgentSpec {
        agent_type: agent_type?,
        capabilities,
        models,
        concurrency,
        instructions: raw.instructions,
    });
    (errors.len() == before).then(|| object(metadata, name, spec, path, at))
}

fn finish_tool(
    path: &str,
    at: Pos,
    doc: RawDoc<RawToolSpec>,
    errors: &mut Vec<Diagnostic>,
) -> Option<Object> {
    let before = errors.len();
    let (meta, spec) = header(path, at, Kind::Tool, doc, errors);
    let (raw, spec_key) = spec?;
    let tool_type = match raw.tool_type {
        None => {
            errors.push(Diagnostic::new(
                path,
                spec_key,
                "missing field `spec.type`: expected one of function, api, script, service",
            ));
            None
        }
        Some(t) => {
            if t.value == ToolType::Script && raw.command.is_empty() {
                errors.push(Diagnostic::new(
                    path,
                    pos_of(&t.referenced),
                    "a script tool needs a `command`",
                ));
            }
            Some(t.value)
        }
    };
    let created_by = match raw.created_by {
        Some(c) => {
            check_name(path, pos_of(&c.referenced), "createdBy", &c.value, errors);
            c.value
        }
        None => default_assignee(),
    };
    let (metadata, name) = meta?;
    let spec = Spec::Tool(ToolSpec {
        tool_type: tool_type?,
        description: raw.description,
        command: raw.command,
        created_by,
    });
    (errors.len() == before).then(|| object(metadata, name, spec, path, at))
}

/// Entries of a list of words that must each say something.
fn non_empty(
    path: &str,
    what: &str,
    items: Vec<Spanned<String>>,
    errors: &mut Vec<Diagnostic>,
) -> Vec<String> {
    items
        .into_iter()
        .map(|item| {
            if item.value.trim().is_empty() {
                errors.push(Diagnostic::new(
                    path,
                    pos_of(&item.referenced),
                    format!("{what} must not be empty"),
                ));
            }
            item.value
        })
        .collect()
}

/// The project a task file belongs to by its place: `projects/<p>/tasks/…`.
pub fn project_from_path(path: &str) -> Option<&str> {
    let mut parts = path.split('/');
    let (Some("projects"), Some(project), Some("tasks")) =
        (parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    parts.next().map(|_| project)
}

fn finish_task(
    path: &str,
    at: Pos,
    doc: RawDoc<RawTaskSpec>,
    errors: &mut Vec<Diagnostic>,
) -> Option<Object> {
    let before = errors.len();
    let (meta, spec) = header(path, at, Kind::Task, doc, errors);
    let (raw, spec_key) = spec?;

    let from_path = project_from_path(path);
    let (project, project_pos) = match (&raw.project, from_path) {
        (Some(p), Some(dir)) if p.value != dir => {
            errors.push(Diagnostic::new(
                path,
                pos_of(&p.referenced),
                format!(
                    "task names project `{}` but its file is under projects/{dir}/tasks/",
                    p.value
                ),
            ));
            (p.value.clone(), pos_of(&p.referenced))
        }
        (Some(p), _) => {
            let pos = pos_of(&p.referenced);
            check_name(path, pos, "project name", &p.value, errors);
            (p.value.clone(), pos)
        }
        (None, Some(dir)) => {
            check_name(path, at, "project directory name", dir, errors);
            (dir.to_owned(), at)
        }
        (None, None) => {
            errors.push(Diagnostic::new(
                path,
                spec_key,
                "task has no project: set spec.project, or put the file under projects/<project>/tasks/",
            ));
            (String::new(), at)
        }
    };

    let title = required_text(path, spec_key, "spec.title", raw.title, errors);

    let assignee = match raw.assignee {
        Some(a) => {
            check_name(path, pos_of(&a.referenced), "assignee", &a.value, errors);
            a.value
        }
        None => default_assignee(),
    };

    let capabilities = non_empty(path, "capability", raw.capabilities, errors);

    let mut depends_on = Vec::with_capacity(raw.depends_on.len());
    let mut depends_pos = Vec::with_capacity(raw.depends_on.len());
    for dep in raw.depends_on {
        let pos = pos_of(&dep.referenced);
        let parts: Vec<&str> = dep.value.split('/').collect();
        let ok = match parts.as_slice() {
            [task] => names::check_dns_label(task).is_ok(),
            [project, task] => {
                names::check_dns_label(project).is_ok() && names::check_dns_label(task).is_ok()
            }
            _ => false,
        };
        if !ok {
            errors.push(Diagnostic::new(
                path,
                pos,
                format!(
                    "invalid dependsOn entry `{}`: expected `task` or `project/task`, each a DNS-1123 label",
                    dep.value
                ),
            ));
        }
        depends_on.push(dep.value);
        depends_pos.push(pos);
    }

    let (action, action_pos) = match raw.action {
        None => {
            errors.push(Diagnostic::new(
                path,
                spec_key,
                "missing field `spec.action`: expected one of prompt, run, tool, plan",
            ));
            (None, spec_key)
        }
        Some(a) => {
            let pos = pos_of(&a.referenced);
            (action(path, pos, a.value, errors), pos)
        }
    };

    let output = match raw.output {
        Some(out) => {
            let mut paths = Vec::with_capacity(out.paths.len());
            for p in out.paths {
                if let Err(why) = names::check_output_path(&p.value) {
                    errors.push(Diagnostic::new(
                        path,
                        pos_of(&p.referenced),
                        format!("invalid output path `{}`: {why}", p.value),
                    ));
                }
                paths.push(p.value);
            }
            Output {
                mode: out.mode,
                paths,
            }
        }
        None => Output::default(),
    };

    let retries = bounded(
        path,
        "retries",
        raw.retries,
        (0, MAX_RETRIES, default_retries()),
        errors,
    );

    let (metadata, name_pos) = meta?;
    let action = action?;
    (errors.len() == before).then(|| Object {
        metadata,
        spec: Spec::Task(TaskSpec {
            project,
            title,
            description: raw.description,
            assignee,
            capabilities,
            priority: raw.priority,
            depends_on,
            action,
            output,
            timeout: raw.timeout,
            retries,
            acceptance_criteria: raw.acceptance_criteria,
        }),
        origin: Origin {
            path: path.to_owned(),
            document: at,
            name: name_pos,
            project: project_pos,
            depends_on: depends_pos,
            action: action_pos,
        },
    })
}

fn action(path: &str, pos: Pos, raw: RawAction, errors: &mut Vec<Diagnostic>) -> Option<Action> {
    // Each kind given, with where its value is.
    let mut given: Vec<(Action, Pos)> = Vec::new();
    if let Some(prompt) = raw.prompt {
        let at = pos_of(&prompt.referenced);
        if prompt.value.trim().is_empty() {
            errors.push(Diagnostic::new(path, at, "action.prompt must not be empty"));
        }
        given.push((Action::Prompt(prompt.value), at));
    }
    if let Some(run) = raw.run {
        let at = pos_of(&run.referenced);
        if run
            .value
            .command
            .first()
            .is_none_or(|p| p.trim().is_empty())
        {
            errors.push(Diagnostic::new(
                path,
                at,
                "action.run.command must name a program",
            ));
        }
        given.push((Action::Run(run.value), at));
    }
    if let Some(tool) = raw.tool {
        let at = pos_of(&tool.referenced);
        let name = match tool.value.name {
            None => {
                errors.push(Diagnostic::new(
                    path,
                    at,
                    "missing field `action.tool.name`",
                ));
                String::new()
            }
            Some(name) => {
                if let Err(why) = names::check_dns_label(&name.value) {
                    errors.push(Diagnostic::new(
                        path,
                        pos_of(&name.referenced),
                        format!("invalid tool name `{}`: {why}", name.value),
                    ));
                }
                name.value
            }
        };
        given.push((
            Action::Tool(ToolAction {
                name,
                with: tool.value.with,
            }),
            at,
        ));
    }
    if let Some(plan) = raw.plan {
        let at = pos_of(&plan.referenced);
        given.push((Action::Plan(plan.value.unwrap_or_default()), at));
    }
    match given.len() {
        1 => given.pop().map(|(action, _)| action),
        0 => {
            errors.push(Diagnostic::new(
                path,
                pos,
                "action must have exactly one of prompt, run, tool, plan; it has none",
            ));
            None
        }
        _ => {
            // Reported at the second kind in the file: the first is taken as the intended one.
            given.sort_by_key(|(_, at)| *at);
            let kinds: Vec<&str> = given.iter().map(|(a, _)| a.kind()).collect();
            errors.push(Diagnostic::new(
                path,
                given[1].1,
                format!(
                    "action must have exactly one of prompt, run, tool, plan; it has {}",
                    kinds.join(", ")
                ),
            ));
            None
        }
    }
}

#[cfg(test)]
mod fast_path_tests {
    use super::*;

    /// The fast path must give exactly what the general path gives, or nothing.
    #[test]
    fn fast_path_agrees_with_the_general_path() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let mut checked = 0;
        for dir in ["examples", "specs/corpus/good", "specs/corpus/bad"] {
            let mut stack = vec![std::path::PathBuf::from(root).join(dir)];
            while let Some(dir) = stack.pop() {
                for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                    let path = entry.path();
                    if path.is_dir() {
                        stack.push(path);
                        continue;
                    }
                    let Ok(text) = std::fs::read_to_string(&path) else {
                        continue;
                    };
                    let rel = path.to_string_lossy().replace(root, "");
                    let rel = rel.trim_start_matches('/');
                    if let Some(fast) = single_document_fast_path(rel, &text) {
                        assert_eq!(fast, parse_text(rel, &text, true), "{rel}");
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked >= 10, "only {checked} files took the fast path");
    }
}

/// The positioned twins read exactly the fields the spec types' schema declares, so that the
/// CRDs and the published JSON Schemas accept what the parser accepts, field for field.
#[cfg(test)]
mod schema_tests {
    use super::*;
    use serde::de::value::Error;

    /// A deserializer that answers only which fields a derived struct asks for.
    struct FieldNames;

    impl<'de> Deserializer<'de> for FieldNames {
        type Error = Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
            Err(de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Error> {
            Err(de::Error::custom(fields.join(",")))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }

    fn fields_read<T: DeserializeOwned>() -> Vec<String> {
        let Err(e) = T::deserialize(FieldNames) else {
            panic!("FieldNames produced a value");
        };
        let mut fields: Vec<String> = e.to_string().split(',').map(str::to_owned).collect();
        fields.sort();
        fields
    }

    fn fields_declared<T: schemars::JsonSchema>() -> Vec<String> {
        let schema = schemars::schema_for!(T).to_value();
        let mut fields: Vec<String> = schema["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("{} has no properties", T::schema_name()))
            .keys()
            .cloned()
            .collect();
        fields.sort();
        fields
    }

    #[test]
    fn the_parser_reads_the_fields_the_schema_declares() {
        assert_eq!(
            fields_read::<RawProjectSpec>(),
            fields_declared::<ProjectSpec>()
        );
        assert_eq!(fields_read::<RawTaskSpec>(), fields_declared::<TaskSpec>());
        assert_eq!(
            fields_read::<RawAgentSpec>(),
            fields_declared::<AgentSpec>()
        );
        assert_eq!(fields_read::<RawToolSpec>(), fields_declared::<ToolSpec>());
        assert_eq!(fields_read::<RawAction>(), fields_declared::<Action>());
        assert_eq!(
            fields_read::<RawToolAction>(),
            fields_declared::<ToolAction>()
        );
        assert_eq!(fields_read::<RawOutput>(), fields_declared::<Output>());
        assert_eq!(fields_read::<RunAction>(), fields_declared::<RunAction>());
        assert_eq!(fields_read::<PlanAction>(), fields_declared::<PlanAction>());
        let metadata = crate::schema::document_schema(Kind::Task);
        let mut declared: Vec<String> = metadata["properties"]["metadata"]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        declared.sort();
        assert_eq!(fields_read::<RawMeta>(), declared);
    }
}
