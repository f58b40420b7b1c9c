//! Good input: what correct files parse into.

use agentops_specs::parse::{MAX_FILE_BYTES, project_from_path};
use agentops_specs::*;

const API: &str = "apiVersion: agentops.dev/v1alpha1";

/// Parses a file that must be correct, and returns its objects.
fn parse_ok(path: &str, text: &str) -> Vec<Object> {
    let parsed = parse_file(path, text.as_bytes());
    assert!(
        parsed.errors.is_empty(),
        "{path}: unexpected errors:\n{}",
        parsed
            .errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(parsed.ours, "{path}: not recognised as ours");
    parsed.objects
}

fn task(object: &Object) -> &TaskSpec {
    match &object.spec {
        Spec::Task(t) => t,
        other => panic!("not a task: {other:?}"),
    }
}

/// One resource of each kind as a person writes them, comments and all.
const DESIGN_EXAMPLE: &str = r#"apiVersion: agentops.dev/v1alpha1
kind: Project
metadata: {name: launch-website, labels: {area: marketing}}
spec:
  title: Launch the company website
  description: Why and what "done" means.
  priority: high
  owner: cos                 # agent accountable for the project
  suspend: false             # true: nothing of it is dispatched
---
apiVersion: agentops.dev/v1alpha1
kind: Task
metadata: {name: draft-copy}
spec:
  project: launch-website    # may be omitted under projects/<p>/tasks/
  title: Draft the landing page copy
  description: Instructions for the agent (markdown).
  assignee: seed             # role (cos | seed) or the name of an Agent
  capabilities: [writing]    # an agent must have all of these
  priority: 70
  dependsOn: [research-competitors]   # tasks of the same project (or other-project/task)
  action:                    # exactly one of:
    prompt: "Write … into site/copy.md"          # LLM work (Seed)
    # run: {command: [bash, -c, "make report"]}  # a command in a fresh checkout
    # tool: {name: web-scrape, with: {url: …}}   # a registered tool
    # plan: {}                                    # Chief of Staff: decompose into sub-tasks
  output: {mode: pull-request, paths: [site/]}    # pull-request | commit | none
  timeout: 30m
  retries: 2
  acceptanceCriteria: ["copy.md exists", "under 300 words"]
---
apiVersion: agentops.dev/v1alpha1
kind: Agent
metadata: {name: copywriter}
spec:
  type: specialist           # cos | seed | specialist | meta
  capabilities: [writing, marketing]
  models: [groq/llama-3.3-70b-versatile, openai/gpt-4o-mini]   # tried in order
  concurrency: 2
  instructions: System prompt for this agent.
---
apiVersion: agentops.dev/v1alpha1
kind: Tool
metadata: {name: web-scrape}
spec:
  type: script               # function | api | script | service
  description: Fetch a page and save its text.
  command: [python3, tools/web_scrape.py, "{url}"]   # arguments filled from the task's `with`
  createdBy: seed
"#;

#[test]
fn design_example_parses_into_the_expected_values() {
    let objects = parse_ok("launch.yaml", DESIGN_EXAMPLE);
    assert_eq!(objects.len(), 4);
    let kinds: Vec<Kind> = objects.iter().map(Object::kind).collect();
    assert_eq!(kinds, [Kind::Project, Kind::Task, Kind::Agent, Kind::Tool]);

    let project = &objects[0];
    assert_eq!(project.name(), "launch-website");
    assert_eq!(project.metadata.labels["area"], "marketing");
    assert_eq!(
        project.spec,
        Spec::Project(ProjectSpec {
            title: "Launch the company website".into(),
            description: r#"Why and what "done" means."#.into(),
            priority: Priority::new(70).unwrap(),
            owner: Some("cos".into()),
            suspend: false,
        })
    );
    assert_eq!(project.origin.path, "launch.yaml");
    assert_eq!(project.origin.document, Pos { line: 1, column: 1 });
    assert_eq!(
        project.origin.name,
        Pos {
            line: 3,
            column: 18
        }
    );

    let draft = &objects[1];
    assert_eq!(draft.name(), "draft-copy");
    assert_eq!(
        *task(draft),
        TaskSpec {
            project: "launch-website".into(),
            title: "Draft the landing page copy".into(),
            description: "Instructions for the agent (markdown).".into(),
            assignee: "seed".into(),
            capabilities: vec!["writing".into()],
            priority: Priority::new(70).unwrap(),
            depends_on: vec!["research-competitors".into()],
            action: Action::Prompt("Write … into site/copy.md".into()),
            output: Output {
                mode: OutputMode::PullRequest,
                paths: vec!["site/".into()],
            },
            timeout: Some(HumanDuration(std::time::Duration::from_secs(1800))),
            retries: 2,
            acceptance_criteria: vec!["copy.md exists".into(), "under 300 words".into()],
        }
    );
    assert_eq!(task(draft).timeout.unwrap().as_secs(), 1800);
    assert_eq!(draft.key().to_string(), "Task launch-website/draft-copy");
    // Positions that validation points at.
    assert_eq!(
        draft.origin.document,
        Pos {
            line: 11,
            column: 1
        }
    );
    assert_eq!(
        draft.origin.name,
        Pos {
            line: 13,
            column: 18
        }
    );
    assert_eq!(
        draft.origin.project,
        Pos {
            line: 15,
            column: 12
        }
    );
    assert_eq!(
        draft.origin.depends_on,
        [Pos {
            line: 21,
            column: 15
        }]
    );

    assert_eq!(
        objects[2].spec,
        Spec::Agent(AgentSpec {
            agent_type: AgentType::Specialist,
            capabilities: vec!["writing".into(), "marketing".into()],
            models: vec![
                "groq/llama-3.3-70b-versatile".into(),
                "openai/gpt-4o-mini".into()
            ],
            concurrency: 2,
            instructions: "System prompt for this agent.".into(),
        })
    );
    assert_eq!(
        objects[3].spec,
        Spec::Tool(ToolSpec {
            tool_type: ToolType::Script,
            description: "Fetch a page and save its text.".into(),
            command: vec![
                "python3".into(),
                "tools/web_scrape.py".into(),
                "{url}".into()
            ],
            created_by: "seed".into(),
        })
    );
}

#[test]
fn design_example_validates_once_its_dependency_exists() {
    let mut objects = parse_ok("launch.yaml", DESIGN_EXAMPLE);
    let validation = validate(&objects);
    let messages: Vec<String> = validation
        .diagnostics
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        messages,
        ["launch.yaml:21:15: dependsOn names task `research-competitors`, which does not exist"]
    );
    assert_eq!(validation.invalid, [false, true, false, false]);

    objects.extend(parse_ok(
        "projects/launch-website/tasks/research.yaml",
        &format!(
            "{API}\nkind: Task\nmetadata: {{name: research-competitors}}\nspec:\n  title: Research\n  action: {{tool: {{name: web-scrape, with: {{url: https://example.com, depth: 2}}}}}}\n"
        ),
    ));
    let validation = validate(&objects);
    assert!(validation.is_ok(), "{:?}", validation.diagnostics);
    assert_eq!(validation.invalid, [false; 5]);
}

#[test]
fn priority_words_become_numbers() {
    for (word, value) in [
        ("critical", 90),
        ("high", 70),
        ("medium", 50),
        ("low", 30),
        ("0", 0),
        ("100", 100),
        ("\"42\"", 42),
    ] {
        let objects = parse_ok(
            "p.yaml",
            &format!(
                "{API}\nkind: Project\nmetadata: {{name: p}}\nspec: {{title: P, priority: {word}}}\n"
            ),
        );
        let Spec::Project(p) = &objects[0].spec else {
            unreachable!()
        };
        assert_eq!(p.priority.value(), value, "{word}");
    }
}

#[test]
fn defaults_fill_what_is_omitted() {
    let objects = parse_ok(
        "t.yaml",
        &format!(
            "{API}\nkind: Project\nmetadata: {{name: p}}\nspec: {{title: P}}\n---\n{API}\nkind: Task\nmetadata: {{name: t}}\nspec: {{project: p, title: T, action: {{prompt: Go}}}}\n---\n{API}\nkind: Agent\nmetadata: {{name: a}}\nspec: {{type: seed}}\n---\n{API}\nkind: Tool\nmetadata: {{name: f}}\nspec: {{type: function}}\n"
        ),
    );
    let Spec::Project(p) = &objects[0].spec else {
        unreachable!()
    };
    assert_eq!(p.priority.value(), 50);
    assert!(!p.suspend && p.owner.is_none() && p.description.is_empty());
    let t = task(&objects[1]);
    assert_eq!(t.assignee, "seed");
    assert_eq!(t.priority.value(), 50);
    assert_eq!(t.retries, 2);
    assert_eq!(t.timeout, None);
    assert_eq!(t.output, Output::default());
    assert_eq!(t.output.mode, OutputMode::PullRequest);
    let Spec::Agent(a) = &objects[2].spec else {
        unreachable!()
    };
    assert_eq!(a.concurrency, 1);
    let Spec::Tool(f) = &objects[3].spec else {
        unreachable!()
    };
    assert_eq!(f.created_by, "seed");
    assert!(validate(&objects).is_ok());
}

#[test]
fn durations_are_read_the_human_way() {
    for (text, secs) in [
        ("30m", 1800),
        ("45s", 45),
        ("1h30m", 5400),
        ("1h 30m", 5400),
        ("2days", 172_800),
        ("1500ms", 1),
        ("10ms", 1),
    ] {
        let objects = parse_ok(
            "t.yaml",
            &format!(
                "{API}\nkind: Task\nmetadata: {{name: t}}\nspec: {{project: p, title: T, action: {{prompt: Go}}, timeout: {text}}}\n"
            ),
        );
        assert_eq!(task(&objects[0]).timeout.unwrap().as_secs(), secs, "{text}");
    }
}

#[test]
fn project_is_inferred_from_the_tasks_directory() {
    let text = format!(
        "{API}\nkind: Task\nmetadata: {{name: draft}}\nspec:\n  title: Draft\n  action: {{prompt: Go}}\n"
    );
    let objects = parse_ok("projects/launch/tasks/draft.yaml", &text);
    assert_eq!(task(&objects[0]).project, "launch");
    // The document is what points at an inferred project.
    assert_eq!(objects[0].origin.project, objects[0].origin.document);

    let objects = parse_ok("projects/launch/tasks/sub/dir/draft.yml", &text);
    assert_eq!(task(&objects[0]).project, "launch");

    // Naming the same project explicitly is fine.
    let explicit = text.replace("  title:", "  project: launch\n  title:");
    let objects = parse_ok("projects/launch/tasks/draft.yaml", &explicit);
    assert_eq!(task(&objects[0]).project, "launch");
    assert_eq!(
        objects[0].origin.project,
        Pos {
            line: 5,
            column: 12
        }
    );

    assert_eq!(project_from_path("projects/a/tasks/t.yaml"), Some("a"));
    assert_eq!(project_from_path("projects/a/tasks/x/t.yaml"), Some("a"));
    assert_eq!(project_from_path("projects/a/tasks"), None);
    assert_eq!(project_from_path("projects/a/project.yaml"), None);
    assert_eq!(project_from_path("other/projects/a/tasks/t.yaml"), None);
    assert_eq!(project_from_path("tasks/t.yaml"), None);
}

#[test]
fn every_action_kind() {
    let cases = [
        ("{prompt: Write it}", Action::Prompt("Write it".into())),
        (
            "{run: {command: [bash, -c, make report]}}",
            Action::Run(RunAction {
                command: vec!["bash".into(), "-c".into(), "make report".into()],
            }),
        ),
        (
            "{tool: {name: web-scrape, with: {url: 'https://example.com', depth: 2, deep: {a: [1, true]}}}}",
            Action::Tool(ToolAction {
                name: "web-scrape".into(),
                with: serde_json::json!({"url": "https://example.com", "depth": 2, "deep": {"a": [1, true]}})
                    .as_object()
                    .unwrap()
                    .clone(),
            }),
        ),
        ("{tool: {name: web-scrape}}", Action::Tool(ToolAction { name: "web-scrape".into(), with: Default::default() })),
        ("{plan: {}}", Action::Plan(PlanAction::default())),
        ("{plan: }", Action::Plan(PlanAction::default())),
        ("{plan: ~}", Action::Plan(PlanAction::default())),
        (
            "{plan: {request: Split it up}}",
            Action::Plan(PlanAction {
                request: Some("Split it up".into()),
            }),
        ),
        ("\n    plan:", Action::Plan(PlanAction::default())),
        ("\n    plan: {}", Action::Plan(PlanAction::default())),
        ("\n    prompt: |\n      Line one\n      Line two", Action::Prompt("Line one\nLine two\n".into())),
    ];
    for (action, expected) in cases {
        let objects = parse_ok(
            "t.yaml",
            &format!(
                "{API}\nkind: Task\nmetadata: {{name: t}}\nspec:\n  project: p\n  title: T\n  action: {action}\n"
            ),
        );
        assert_eq!(task(&objects[0]).action, expected, "{action}");
        assert_eq!(task(&objects[0]).action.kind(), expected.kind());
    }
}

#[test]
fn multi_document_files_with_empty_documents_and_markers() {
    let text = format!(
        "%YAML 1.2\n---\n# nothing here\n---\n{API}\nkind: Agent\nmetadata: {{name: a}}\nspec: {{type: cos}}\n...\n---\n---\n{API}\nkind: Agent\nmetadata: {{name: b}}\nspec: {{type: meta}}\n---\n"
    );
    let objects = parse_ok("agents.yml", &text);
    let names: Vec<&str> = objects.iter().map(Object::name).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(objects[0].origin.document, Pos { line: 5, column: 1 });
    assert_eq!(
        objects[1].origin.document,
        Pos {
            line: 12,
            column: 1
        }
    );
    assert_eq!(
        objects[1].origin.name,
        Pos {
            line: 14,
            column: 18
        }
    );
}

#[test]
fn yml_and_yaml_are_spec_paths() {
    assert!(is_spec_path("a.yaml"));
    assert!(is_spec_path("projects/p/tasks/t.yml"));
    assert!(!is_spec_path("README.md"));
    assert!(!is_spec_path("a.yaml.bak"));
}

#[test]
fn foreign_files_are_not_ours() {
    for (path, bytes) in [
        (
            "deploy.yaml",
            &b"apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: Web_1}\nspec: {replicas: 2}\n"[..],
        ),
        ("compose.yml", b"services:\n  web: {image: nginx}\n"),
        ("list.yaml", b"- apiVersion: agentops.dev/v1alpha1\n  kind: Task\n"),
        ("scalar.yaml", b"just text\n"),
        ("empty.yaml", b""),
        ("broken.yaml", b"a: [unclosed\n"),
        // Mentions our group, but not as its apiVersion: a Role, broken by templating.
        (
            "role.yaml",
            b"{{- if .Values.rbac }}\nrules:\n  - apiGroups: [agentops.dev]\n{{- end }}\n",
        ),
        ("binary.yaml", b"\xff\xfe\x00\x01"),
        (
            "other-group.yaml",
            b"apiVersion: agentops.dev.example.com/v1\nkind: Task\nmetadata: {}\n",
        ),
        (
            "numeric-api.yaml",
            b"apiVersion: 1\nkind: Task\n# agentops.dev\n",
        ),
    ] {
        let parsed = parse_file(path, bytes);
        assert_eq!(parsed, ParsedFile::default(), "{path}");
        assert!(!parsed.ours, "{path}");
    }

    // Too large, but someone else's: ignored rather than reported.
    let big = vec![b'#'; MAX_FILE_BYTES + 1];
    assert_eq!(parse_file("big.yaml", &big), ParsedFile::default());
    // Exactly at the limit is read.
    let mut at_limit = format!("{API}\nkind: Agent\nmetadata: {{name: a}}\nspec: {{type: seed}}\n");
    at_limit.push_str(&"#".repeat(MAX_FILE_BYTES - at_limit.len()));
    assert_eq!(at_limit.len(), MAX_FILE_BYTES);
    assert_eq!(parse_ok("limit.yaml", &at_limit).len(), 1);
}

#[test]
fn a_foreign_document_beside_ours_is_skipped() {
    let text = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: Not_Ours}}\ndata: {{x: y}}\n---\n{API}\nkind: Agent\nmetadata: {{name: a}}\nspec: {{type: seed}}\n"
    );
    let objects = parse_ok("mixed.yaml", &text);
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0].name(), "a");
}

#[test]
fn a_bad_document_does_not_hide_the_good_ones() {
    let text = format!(
        "{API}\nkind: Agent\nmetadata: {{name: Bad}}\nspec: {{type: seed}}\n---\n{API}\nkind: Agent\nmetadata: {{name: good}}\nspec: {{type: seed}}\n"
    );
    let parsed = parse_file("agents.yaml", text.as_bytes());
    assert_eq!(parsed.errors.len(), 1);
    assert_eq!(
        parsed.errors[0].pos(),
        Pos {
            line: 3,
            column: 18
        }
    );
    let names: Vec<&str> = parsed.objects.iter().map(Object::name).collect();
    assert_eq!(names, ["good"]);
    assert!(!parsed.is_ok());
}

#[test]
fn dependency_keys_qualify_names() {
    let objects = parse_ok(
        "projects/web/tasks/t.yaml",
        &format!(
            "{API}\nkind: Task\nmetadata: {{name: t}}\nspec:\n  title: T\n  dependsOn: [design, api/endpoint, web/copy]\n  action: {{prompt: Go}}\n"
        ),
    );
    let keys: Vec<(&str, &str)> = task(&objects[0]).dependency_keys().collect();
    assert_eq!(
        keys,
        [("web", "design"), ("api", "endpoint"), ("web", "copy")]
    );
}

#[test]
fn a_correct_set_across_files_validates_cleanly() {
    let files = [
        (
            "projects/web/project.yaml",
            format!("{API}\nkind: Project\nmetadata: {{name: web}}\nspec: {{title: Web}}\n"),
        ),
        (
            "projects/api/project.yaml",
            format!("{API}\nkind: Project\nmetadata: {{name: api}}\nspec: {{title: API}}\n"),
        ),
        (
            "projects/web/tasks/page.yaml",
            format!(
                "{API}\nkind: Task\nmetadata: {{name: page}}\nspec: {{title: Page, dependsOn: [copy, api/endpoint], action: {{prompt: Build}}}}\n"
            ),
        ),
        (
            "projects/web/tasks/copy.yaml",
            format!(
                "{API}\nkind: Task\nmetadata: {{name: copy}}\nspec: {{title: Copy, action: {{prompt: Write}}}}\n"
            ),
        ),
        (
            "projects/api/tasks/endpoint.yaml",
            // Same task name in another project is not a duplicate.
            format!(
                "{API}\nkind: Task\nmetadata: {{name: endpoint}}\nspec: {{title: Endpoint, dependsOn: [schema], action: {{prompt: Build}}}}\n---\n{API}\nkind: Task\nmetadata: {{name: schema}}\nspec: {{title: Schema, action: {{plan: {{}}}}}}\n---\n{API}\nkind: Task\nmetadata: {{name: copy}}\nspec: {{title: API copy, action: {{prompt: Write}}}}\n"
            ),
        ),
        (
            "agents/copy.yaml",
            // An Agent and a Tool may share a task's name: keys differ by kind.
            format!(
                "{API}\nkind: Agent\nmetadata: {{name: copy}}\nspec: {{type: specialist}}\n---\n{API}\nkind: Tool\nmetadata: {{name: copy}}\nspec: {{type: api}}\n"
            ),
        ),
    ];
    let mut objects = Vec::new();
    for (path, text) in &files {
        objects.extend(parse_ok(path, text));
    }
    assert_eq!(objects.len(), 9);
    let validation = validate(&objects);
    assert!(validation.is_ok(), "{:?}", validation.diagnostics);
    assert_eq!(validation.invalid, vec![false; objects.len()]);

    // The verdict does not depend on the order files were read in.
    objects.reverse();
    assert!(validate(&objects).is_ok());
}

#[test]
fn a_long_dependency_chain_is_not_a_cycle_and_does_not_overflow() {
    let mut text = format!("{API}\nkind: Project\nmetadata: {{name: p}}\nspec: {{title: P}}\n");
    let n = 5_000;
    for i in 0..n {
        let dep = if i + 1 < n {
            format!("dependsOn: [t{}], ", i + 1)
        } else {
            String::new()
        };
        text += &format!(
            "---\n{API}\nkind: Task\nmetadata: {{name: t{i}}}\nspec: {{project: p, title: T, {dep}action: {{prompt: Go}}}}\n"
        );
    }
    let objects = parse_ok("chain.yaml", &text);
    assert_eq!(objects.len(), n + 1);
    assert!(validate(&objects).is_ok());
}

#[test]
fn a_long_cycle_tells_every_member_with_a_bounded_message() {
    let mut text = format!("{API}\nkind: Project\nmetadata: {{name: p}}\nspec: {{title: P}}\n");
    let n = 5_000;
    for i in 0..n {
        text += &format!(
            "---\n{API}\nkind: Task\nmetadata: {{name: t{i}}}\nspec: {{project: p, title: T, dependsOn: [t{}], action: {{prompt: Go}}}}\n",
            (i + 1) % n
        );
    }
    let objects = parse_ok("ring.yaml", &text);
    let started = std::time::Instant::now();
    let validation = validate(&objects);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(validation.diagnostics.len(), n);
    assert!(validation.invalid[1..].iter().all(|&i| i));
    let first = validation
        .diagnostics
        .iter()
        .find(|d| d.message.starts_with("dependency cycle: t42 → "))
        .expect("t42 is told");
    assert_eq!(
        first.message,
        "dependency cycle: t42 → t43 → t44 → t45 → t46 → t47 → t48 → t49 → t50 → t51 → t52 \
         → t53 → … 4988 more → t42"
    );
}

#[test]
fn diagnostics_print_as_path_line_column_message() {
    let parsed = parse_file(
        "p.yaml",
        format!("{API}\nkind: Project\nmetadata: {{name: p}}\nspec: {{title: P, priority: 101}}\n")
            .as_bytes(),
    );
    assert_eq!(parsed.errors.len(), 1);
    let line = parsed.errors[0].to_string();
    assert!(line.starts_with("p.yaml:4:"), "{line}");
    assert!(line.contains("priority 101 is out of range"), "{line}");
}
