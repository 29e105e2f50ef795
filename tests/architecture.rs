//! ARCHITECTURE.md's code map stays in step with the tree: every source file of the daemon,
//! the handlers crate and the examples is named in it (by its path, or by a glob such as
//! `src/client/*.lua`), every other file by its path or a folder row, and every path the map
//! names exists. A file added without a row, or a row left behind by a move, fails here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Folders whose files are all listed one by one (or by a glob): the code.
const CODE: &[&str] = &["src/", "handlers/src/", "examples/"];
/// Folders a folder row may cover as a whole: tests, scripts, deployment and sample files.
const OTHER: &[&str] = &["tests/", "scripts/", "deploy/", "config/", "docs/"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every file below `dir` (relative to the root, with `/`), skipping build output.
fn files(dir: &str, out: &mut BTreeSet<String>) {
    let path = root().join(dir);
    let Ok(read) = std::fs::read_dir(&path) else {
        return;
    };
    for entry in read {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "target" || name.starts_with('.') {
            continue;
        }
        let rel = format!("{dir}{name}");
        if entry.file_type().unwrap().is_dir() {
            files(&format!("{rel}/"), out);
        } else {
            out.insert(rel);
        }
    }
}

/// `a/{b,c}.rs` → `a/b.rs`, `a/c.rs` (one level of braces, as the map writes them).
fn expand(token: &str) -> Vec<String> {
    match (token.find('{'), token.find('}')) {
        (Some(open), Some(close)) if open < close => token[open + 1..close]
            .split(',')
            .map(|part| format!("{}{}{}", &token[..open], part, &token[close + 1..]))
            .collect(),
        _ => vec![token.to_owned()],
    }
}

/// The backticked paths in the code map section, expanded. A cell such as
/// "`handlers/src/effect.rs`, `store.rs`" must spell each path out: a bare file name is not a
/// path and does not count.
fn map_paths(text: &str) -> Vec<String> {
    let start = text
        .find("## Code map")
        .expect("ARCHITECTURE.md has a `## Code map` section");
    let section = &text[start + 3..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let roots: Vec<&str> = CODE.iter().chain(OTHER).copied().collect();
    section
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|token| !token.contains(' ') && roots.iter().any(|r| token.starts_with(r)))
        .flat_map(expand)
        .collect()
}

/// `*` matches within one path segment.
fn glob_matches(pattern: &str, path: &str) -> bool {
    let (Some((pdir, pfile)), Some((dir, file))) =
        (pattern.rsplit_once('/'), path.rsplit_once('/'))
    else {
        return false;
    };
    if pdir != dir {
        return false;
    }
    match pfile.split_once('*') {
        Some((pre, post)) => {
            file.len() >= pre.len() + post.len() && file.starts_with(pre) && file.ends_with(post)
        }
        None => pfile == file,
    }
}

fn covered(file: &str, paths: &[String]) -> bool {
    paths.iter().any(|p| {
        p == file
            || (p.contains('*') && glob_matches(p, file))
            || (p.ends_with('/')
                && file.starts_with(p.as_str())
                && !CODE.iter().any(|c| file.starts_with(c)))
    })
}

#[test]
fn every_file_has_a_row_in_the_code_map_and_every_row_names_a_file() {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let paths = map_paths(&text);
    let mut tree = BTreeSet::new();
    for dir in CODE.iter().chain(OTHER) {
        files(dir, &mut tree);
    }
    assert!(
        tree.contains("src/lib.rs"),
        "the walk found the tree: {tree:?}"
    );

    let missing: Vec<&String> = tree.iter().filter(|f| !covered(f, &paths)).collect();
    assert!(
        missing.is_empty(),
        "files without a row in ARCHITECTURE.md's code map (add a row naming the file by its \
         path, saying which decision it owns):\n  {}",
        missing
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n  ")
    );

    let stale: Vec<&String> = paths
        .iter()
        .filter(|p| {
            if p.contains('*') {
                !tree.iter().any(|f| glob_matches(p, f))
            } else {
                !Path::new(&root().join(p.as_str())).exists()
            }
        })
        .collect();
    assert!(
        stale.is_empty(),
        "the code map names paths that do not exist (moved or deleted? update the row):\n  {}",
        stale
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}

#[test]
fn the_map_reader_expands_braces_and_matches_globs() {
    assert_eq!(expand("a/{b,c}.rs"), ["a/b.rs", "a/c.rs"]);
    assert!(glob_matches("src/client/*.lua", "src/client/claim.lua"));
    assert!(!glob_matches(
        "src/client/*.lua",
        "src/client/sub/claim.lua"
    ));
    assert!(!glob_matches("src/client/*.lua", "src/client/mod.rs"));
    let paths = vec![
        "src/a.rs".to_owned(),
        "tests/it/".to_owned(),
        "src/b/".to_owned(),
    ];
    assert!(covered("src/a.rs", &paths));
    assert!(covered("tests/it/x.rs", &paths));
    // A folder row does not cover code: each source file needs its own.
    assert!(!covered("src/b/c.rs", &paths));
}
