//! Robustness without a fuzzing toolchain.
//!
//! `fuzz_regressions` replays the inputs the libFuzzer target (`fuzz/`) once failed on, kept in
//! `specs/corpus/fuzz-regressions/`. `mutated_corpus` is a small seeded mutation fuzzer over the
//! corpus files, with the same checks as the libFuzzer target, so that CI (which has no nightly
//! toolchain) still throws a few thousand hostile inputs at the parser on every run.
//!
//! `AGENTOPS_FUZZ_ITERS=200000 cargo test --release -p agentops-specs --test fuzz` runs longer;
//! `AGENTOPS_FUZZ_SEED` picks another random sequence. A failing input is written to the
//! system's temporary directory and its path printed.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentops_specs::{parse_file, validate};

/// Paths the first byte of an input selects, as in `fuzz/fuzz_targets/parse_file.rs`.
const PATHS: [&str; 6] = [
    "spec.yaml",
    "projects/p/tasks/t.yaml",
    "projects/p/tasks/nested/t.yml",
    "projects/Not_A_Label/tasks/t.yaml",
    "projects/p/project.yml",
    "agents/a.yaml",
];

/// The fuzz target's checks: parse the input as a file, validate what it declared.
fn check(data: &[u8]) {
    let (path, bytes) = match data.split_first() {
        Some((first, rest)) => (PATHS[usize::from(*first) % PATHS.len()], rest),
        None => (PATHS[0], data),
    };
    let parsed = parse_file(path, bytes);
    // Lines as YAML counts them: `\n`, `\r\n` or a lone `\r` ends one.
    let lines = bytes
        .iter()
        .enumerate()
        .filter(|&(i, b)| *b == b'\n' || (*b == b'\r' && bytes.get(i + 1) != Some(&b'\n')))
        .count()
        + 1;
    for d in &parsed.errors {
        assert_eq!(d.path, path);
        assert!(d.line >= 1 && d.column >= 1, "{d}");
        assert!(d.line as usize <= lines, "{d}: the file has {lines} lines");
        assert!(!d.message.starts_with("internal error"), "{d}");
    }
    assert!(parsed.errors.is_empty() || parsed.ours);
    assert!(parsed.objects.is_empty() || parsed.ours);
    assert_eq!(parse_file(path, bytes), parsed, "not deterministic");

    let validation = validate(&parsed.objects);
    assert_eq!(validation.invalid.len(), parsed.objects.len());
    for d in &validation.diagnostics {
        assert_eq!(d.path, path);
        assert!(d.line >= 1 && d.column >= 1, "{d}");
    }
    let twice: Vec<_> = parsed
        .objects
        .iter()
        .chain(&parsed.objects)
        .cloned()
        .collect();
    assert!(parsed.objects.is_empty() || !validate(&twice).is_ok());
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// Runs `check`, turning a panic into its message.
fn guarded(data: &[u8]) -> Result<(), String> {
    panic::catch_unwind(AssertUnwindSafe(|| check(data))).map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default()
    })
}

/// Even an unoptimised build reads any input of the corpus' size in well under this.
const SLOW: Duration = Duration::from_secs(5);

#[test]
fn fuzz_regressions() {
    let mut inputs = Vec::new();
    files_under(&corpus().join("fuzz-regressions"), &mut inputs);
    inputs.retain(|p| p.extension().is_none_or(|e| e != "md"));
    inputs.sort();
    assert!(!inputs.is_empty());
    let mut failures = Vec::new();
    for input in &inputs {
        let data = fs::read(input).unwrap();
        let started = Instant::now();
        if let Err(why) = guarded(&data) {
            failures.push(format!("{}: {why}", input.display()));
        }
        let took = started.elapsed();
        if took > SLOW {
            failures.push(format!("{}: took {took:?}", input.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// xorshift64*: small, seeded, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const TOKENS: &[&str] = &[
    "---\n",
    "...\n",
    ": ",
    "- ",
    "? ",
    "[",
    "]",
    "{",
    "}",
    ", ",
    "&a ",
    "*a",
    "<<: *a",
    "!!str ",
    "!!binary ",
    "!t ",
    "|\n",
    ">-\n",
    "\"",
    "'",
    "#",
    "\t",
    "\r",
    "\r\n",
    "\n  ",
    "\n    ",
    "~",
    "null",
    "true",
    ".nan",
    "0x1F",
    "1e999",
    "-1",
    "101",
    "\u{feff}",
    "\u{85}",
    "\u{2028}",
    "é",
    "\\u0000",
    "apiVersion: agentops.dev/v1alpha1\n",
    "apiVersion: agentops.dev/v2\n",
    "kind: Project\n",
    "kind: Task\n",
    "kind: Agent\n",
    "kind: Tool\n",
    "metadata:",
    "name: ",
    "labels:",
    "spec:",
    "title: ",
    "priority: ",
    "project: ",
    "assignee: ",
    "capabilities: ",
    "dependsOn: ",
    "action:",
    "prompt: ",
    "run:",
    "command: ",
    "tool:",
    "with:",
    "plan:",
    "output:",
    "paths: ",
    "timeout: ",
    "retries: ",
    "type: ",
    "concurrency: ",
    "createdBy: ",
    "../",
    ".git/",
    ".agentops/",
    "/abs",
];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], input: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        let len = input.len();
        match rng.below(11) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                input.insert(i, rng.next() as u8);
            }
            3 | 4 => {
                let i = rng.below(len + 1);
                let token = TOKENS[rng.below(TOKENS.len())].as_bytes();
                input.splice(i..i, token.iter().copied());
            }
            5 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(32));
                input.drain(i..i + n);
            }
            6 if len > 0 => {
                input.truncate(rng.below(len));
            }
            7 if len > 0 => {
                // Repeat a chunk: nesting, long lines, many documents.
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                let chunk = input[i..i + n].to_vec();
                let times = 1 + rng.below(64);
                for _ in 0..times {
                    input.splice(i..i, chunk.iter().copied());
                }
            }
            8 => {
                // Splice: this input's head, another seed's tail.
                let other = &seeds[rng.below(seeds.len())];
                let head = rng.below(len + 1);
                let tail = rng.below(other.len() + 1);
                input.truncate(head);
                input.extend_from_slice(&other[tail..]);
            }
            9 if len > 0 => {
                // Swap two lines.
                let text = input.clone();
                let mut lines: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
                let (a, b) = (rng.below(lines.len()), rng.below(lines.len()));
                lines.swap(a, b);
                *input = lines.join(&b'\n');
            }
            _ => {
                // Change the path the input is read as.
                if let Some(first) = input.first_mut() {
                    *first = rng.next() as u8;
                }
            }
        }
        if input.len() > 64 * 1024 {
            input.truncate(64 * 1024);
        }
    }
}

#[test]
fn mutated_corpus() {
    let iterations: usize = std::env::var("AGENTOPS_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000);
    let seed: u64 = std::env::var("AGENTOPS_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5EED_A6E7_0B5D_2026);

    let mut paths = Vec::new();
    for folder in ["bad", "good", "fuzz-regressions"] {
        files_under(&corpus().join(folder), &mut paths);
    }
    paths.sort();
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for path in &paths {
        if path
            .extension()
            .is_some_and(|e| e == "expected" || e == "md")
        {
            continue;
        }
        let bytes = fs::read(path).unwrap();
        if bytes.len() > 64 * 1024 {
            continue;
        }
        // A seed's first byte picks the path; the corpus files are read as `spec.yaml` and as
        // a task under `projects/p/tasks/`.
        for selector in [0u8, 1] {
            let mut seed = vec![selector];
            seed.extend_from_slice(&bytes);
            seeds.push(seed);
        }
    }
    assert!(seeds.len() > 50, "only {} seeds", seeds.len());

    let hook = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let mut rng = Rng(seed | 1);
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut failure = None;
    for n in 0..iterations {
        let mut input = seeds[rng.below(seeds.len())].clone();
        mutate(&mut rng, &seeds, &mut input);
        let t = Instant::now();
        let result = guarded(&input);
        let took = t.elapsed();
        slowest = slowest.max(took);
        let why = match result {
            Err(why) => why,
            Ok(()) if took > SLOW => format!("took {took:?}"),
            Ok(()) => continue,
        };
        let file = std::env::temp_dir().join(format!("agentops-fuzz-{seed:x}-{n}.bin"));
        fs::write(&file, &input).unwrap();
        failure = Some(format!(
            "input {n} failed: {why}\nsaved to {}; keep it in specs/corpus/fuzz-regressions/ once fixed",
            file.display()
        ));
        break;
    }
    panic::set_hook(hook);
    if let Some(failure) = failure {
        panic!("{failure}");
    }
    println!(
        "{iterations} mutated inputs in {:?}; slowest {slowest:?}",
        started.elapsed()
    );
}
