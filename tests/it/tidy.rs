//! The layout holds: every crate depends on exactly the amplog crates ARCHITECTURE.md lists
//! for it, and no source outside `projections` (and the benchmarks' raw baselines) names a
//! read-model table in SQL.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const CRATE_DIRS: &[&str] = &[
    ".",
    "domain",
    "migrations",
    "commands/log",
    "commands",
    "projections",
    "streams",
    "gateways/providers",
    "gateways/simulator",
    "gateways/api",
    "benches",
];
const READ_MODELS: &[&str] = &[
    "installations",
    "connections",
    "operations",
    "read_states",
    "usage_daily",
    "installation_streams",
    "integrations",
];

/// `name: dep dep ...` lines of the fenced block after "The edges, exactly".
fn documented_edges() -> BTreeMap<String, Vec<String>> {
    let map = std::fs::read_to_string(Path::new(ROOT).join("ARCHITECTURE.md")).unwrap();
    let block = map.split("The edges, exactly").nth(1).expect("ARCHITECTURE.md lists the crate edges");
    let block = block.split("```text").nth(1).unwrap().split("```").next().unwrap();
    block
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(name, deps)| {
            let mut deps: Vec<String> = deps.split_whitespace().map(str::to_string).collect();
            deps.sort();
            (name.trim().to_string(), deps)
        })
        .collect()
}

/// A crate's name and the amplog crates of its `[dependencies]`.
fn manifest_edges(dir: &str) -> (String, Vec<String>) {
    let text = std::fs::read_to_string(Path::new(ROOT).join(dir).join("Cargo.toml")).unwrap();
    let mut name = None;
    let mut section = "";
    let mut deps = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section == "[package]" && line.starts_with("name") && name.is_none() {
            name = line.split('"').nth(1).map(str::to_string);
        } else if section == "[dependencies]" && line.starts_with("amplog-") {
            deps.push(line.split([' ', '.', '=']).next().unwrap().to_string());
        }
    }
    deps.sort();
    (name.expect("a package name"), deps)
}

#[test]
fn crate_edges_are_the_documented_ones() {
    let documented = documented_edges();
    let actual: BTreeMap<String, Vec<String>> = CRATE_DIRS.iter().map(|d| manifest_edges(d)).collect();
    for (name, deps) in &actual {
        assert_eq!(
            documented.get(name),
            Some(deps),
            "{name}'s amplog dependencies differ from ARCHITECTURE.md's edges: change the map first"
        );
    }
    assert_eq!(documented.len(), actual.len(), "ARCHITECTURE.md lists a crate that does not exist");
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `FROM table`, `JOIN table`, `INTO table`, `UPDATE table` of a read-model table.
fn read_model_sql(text: &str) -> Option<String> {
    let words: Vec<&str> = text.split(|c: char| c.is_whitespace() || c == '"' || c == '(').collect();
    words.windows(2).find_map(|w| {
        let table = w[1].trim_end_matches([',', ';', ')']);
        (matches!(w[0], "FROM" | "JOIN" | "INTO" | "UPDATE") && READ_MODELS.contains(&table))
            .then(|| format!("{} {table}", w[0]))
    })
}

#[test]
fn no_read_model_sql_outside_projections() {
    let mut files = Vec::new();
    for dir in CRATE_DIRS.iter().filter(|d| !matches!(**d, "projections" | "benches")) {
        let src = Path::new(ROOT).join(dir).join("src");
        if src.is_dir() {
            rust_files(&src, &mut files);
        }
    }
    let offenders: Vec<String> = files
        .iter()
        .filter_map(|f| {
            read_model_sql(&std::fs::read_to_string(f).unwrap()).map(|sql| format!("{}: {sql}", f.display()))
        })
        .collect();
    assert!(offenders.is_empty(), "read-model SQL belongs in projections::queries: {offenders:#?}");
    assert_eq!(read_model_sql("SELECT doc FROM read_states WHERE"), Some("FROM read_states".into()));
}
