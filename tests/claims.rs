//! Every promise of README.md and docs/*.md has a test, and the table saying which is
//! complete: `tests/claims.toml` maps each claim unit of those files to the tests that would
//! fail if the promise broke, or marks it as not a behaviour with a one-word reason.
//!
//! A claim unit is one sentence of a paragraph or of a list item, outside fenced code
//! blocks, tables and headings (the defaults tables are kept honest by
//! `deploy::the_configuration_defaults_tables_are_what_check_prints`). The units are
//! computed from the text alone, so adding a sentence to the README or a page under docs/
//! without a row in the table fails here, with the row to add. `docs/SUMMARY.md`, the
//! book's table of contents, holds links only; the links of every file are checked by
//! `every_relative_link_in_the_docs_resolves`.
//!
//! A row names its unit by a short quote: a piece of the sentence (whitespace is
//! normalised) that occurs in exactly one unit of its file. Quotes are stable under edits
//! elsewhere in the sentence, and a quote that no longer matches anything fails too, so the
//! table cannot silently go stale.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    claim: Vec<Row>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Row {
    /// `README.md` or `docs/<name>.md`.
    doc: String,
    /// A piece of exactly one claim unit of `doc`.
    quote: String,
    /// Test paths: `it::<module>::<fn>`, `deploy::<fn>`, `observability_assets::<fn>`,
    /// `claims::<fn>`, or `unit::<crate dir>::<fn>` for a unit test under `src/` or
    /// `handlers/src/`.
    #[serde(default)]
    tests: Vec<String>,
    /// Instead of tests: why the sentence promises no behaviour, in one word (`navigation`,
    /// `summary`, `advice`, `example`, …).
    not_a_behaviour: Option<String>,
    /// Instead of tests: a promise no test covers yet, saying what the missing test would
    /// have to do. Allowed so that known gaps are listed rather than hidden; each is printed
    /// by `the_untested_promises_are_listed` and counted in its output.
    untested: Option<String>,
}

fn table() -> Table {
    let path = repo().join("tests/claims.toml");
    toml::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()))
}

/// Every docs/*.md, sorted, including `docs/SUMMARY.md`.
fn docs_pages() -> Vec<String> {
    let mut pages: Vec<String> = std::fs::read_dir(repo().join("docs"))
        .expect("docs/ exists")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("md"))
        .map(|p| format!("docs/{}", p.file_name().unwrap().to_string_lossy()))
        .collect();
    pages.sort();
    pages
}

/// The book's table of contents: links only, no prose (so not a document with claims).
const SUMMARY: &str = "docs/SUMMARY.md";

/// The documents whose claims the table covers: README.md and every docs/*.md page of the
/// book (a new page is covered as soon as it exists).
fn documents() -> Vec<String> {
    let mut docs = vec!["README.md".to_owned()];
    docs.extend(docs_pages().into_iter().filter(|p| p != SUMMARY));
    docs
}

fn normalise(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The claim units of a Markdown text: blocks are paragraphs and list items (a line
/// starting with `- ` or `1. ` opens an item; indented lines continue it), split into
/// sentences. Fenced code, tables, headings and HTML comments are not claims.
fn claim_units(markdown: &str) -> Vec<String> {
    let mut blocks: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut in_code = false;
    let flush = |current: &mut String, blocks: &mut Vec<String>| {
        let text = normalise(current);
        if !text.is_empty() {
            blocks.push(text);
        }
        current.clear();
    };
    for line in markdown.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") {
            flush(&mut current, &mut blocks);
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        if trimmed.is_empty()
            || trimmed.starts_with('|')
            || trimmed.starts_with('#')
            || trimmed.starts_with("<!--")
        {
            flush(&mut current, &mut blocks);
            continue;
        }
        // A list item's marker is not part of its text.
        let item = trimmed.strip_prefix("- ").or_else(|| {
            trimmed
                .split_once(". ")
                .filter(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
                .map(|(_, rest)| rest)
        });
        if item.is_some() {
            flush(&mut current, &mut blocks);
        }
        current.push(' ');
        current.push_str(item.unwrap_or(trimmed));
    }
    flush(&mut current, &mut blocks);
    blocks.iter().flat_map(|b| sentences(b)).collect()
}

/// Splits after `.`, `!` or `?` followed by a space and a capital letter, a backtick, `**`
/// or a link, unless the word before is an abbreviation (`e.g.`, `i.e.`) and outside
/// backtick code spans.
fn sentences(block: &str) -> Vec<String> {
    let chars: Vec<char> = block.chars().collect();
    let mut out = Vec::new();
    let mut start = 0;
    let mut in_code = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '`' {
            in_code = !in_code;
        } else if !in_code
            && matches!(c, '.' | '!' | '?')
            && chars.get(i + 1) == Some(&' ')
            && chars
                .get(i + 2)
                .is_some_and(|n| n.is_uppercase() || matches!(n, '`' | '*' | '['))
        {
            let before: String = chars[start..=i].iter().collect();
            let abbreviation = ["e.g.", "i.e.", "vs.", "etc."]
                .iter()
                .any(|a| before.ends_with(a));
            if !abbreviation {
                out.push(before.trim().to_owned());
                start = i + 2;
            }
        }
        i += 1;
    }
    let rest: String = chars[start..].iter().collect();
    if !rest.trim().is_empty() {
        out.push(rest.trim().to_owned());
    }
    out
}

/// Whether the test a path names exists and is a test (`#[test]` or `#[tokio::test]` just
/// above its `fn`).
fn test_exists(path: &str) -> Result<(), String> {
    let parts: Vec<&str> = path.split("::").collect();
    let name = *parts.last().unwrap();
    let files: Vec<PathBuf> = match parts.as_slice() {
        ["it", module, .., _] => {
            let single = repo().join(format!("tests/it/{module}.rs"));
            let dir = repo().join(format!("tests/it/{module}"));
            let mut files = vec![single];
            if dir.is_dir() {
                for e in std::fs::read_dir(&dir).unwrap() {
                    files.push(e.unwrap().path());
                }
            }
            files
        }
        ["example", krate, _] => rust_files(&repo().join("examples").join(krate)),
        [
            binary @ ("deploy" | "observability_assets" | "claims" | "public_api"),
            _,
        ] => {
            vec![repo().join(format!("tests/{binary}.rs"))]
        }
        ["unit", krate @ ("streamworker" | "handlers"), ..] => {
            let root = if *krate == "handlers" {
                "handlers/src"
            } else {
                "src"
            };
            rust_files(&repo().join(root))
        }
        _ => {
            return Err(format!(
                "`{path}` is not a test path: use it::<module>::<fn>, deploy::<fn>, \
                 observability_assets::<fn>, claims::<fn>, public_api::<fn>, \
                 example::<crate>::<fn> or unit::<streamworker|handlers>::<fn>"
            ));
        }
    };
    let needle = format!("fn {name}(");
    for file in files.iter().filter(|f| f.is_file()) {
        let text = read(file);
        let lines: Vec<&str> = text.lines().collect();
        for (n, line) in lines.iter().enumerate() {
            if line.contains(&needle) {
                let above = &lines[n.saturating_sub(4)..n];
                if above
                    .iter()
                    .any(|l| l.contains("#[test]") || l.contains("#[tokio::test"))
                {
                    return Ok(());
                }
            }
        }
    }
    Err(format!(
        "`{path}`: no test `fn {name}(` (with #[test] just above) in {}",
        files
            .iter()
            .map(|f| f.strip_prefix(repo()).unwrap_or(f).display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().and_then(|e| e.to_str()) == Some("rs") {
                found.push(p);
            }
        }
    }
    found
}

#[test]
fn every_claim_of_the_readme_and_docs_is_mapped_to_tests_or_marked() {
    let table = table();
    let mut problems = Vec::new();
    let mut rows_by_doc: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
    for row in &table.claim {
        rows_by_doc.entry(&row.doc).or_default().push(row);
        let kinds = usize::from(!row.tests.is_empty())
            + usize::from(row.not_a_behaviour.is_some())
            + usize::from(row.untested.is_some());
        if kinds != 1 {
            problems.push(format!(
                "tests/claims.toml: {} \"{}\": give exactly one of `tests = [...]`, \
                 `not_a_behaviour = \"<reason>\"` or `untested = \"<the test it needs>\"`",
                row.doc, row.quote
            ));
        }
        match &row.not_a_behaviour {
            Some(reason) if reason.trim().is_empty() || reason.contains(' ') => {
                problems.push(format!(
                    "tests/claims.toml: {} \"{}\": not_a_behaviour is one word (navigation, summary, advice, …)",
                    row.doc, row.quote
                ))
            }
            _ => {}
        }
    }
    let docs = documents();
    for doc in rows_by_doc.keys() {
        if !docs.iter().any(|d| d == doc) {
            problems.push(format!(
                "tests/claims.toml: doc = \"{doc}\" is not README.md or a docs/*.md file"
            ));
        }
    }
    let mut units_total = 0;
    for doc in &docs {
        let units = claim_units(&read(&repo().join(doc)));
        units_total += units.len();
        let rows = rows_by_doc.get(doc.as_str()).cloned().unwrap_or_default();
        for row in &rows {
            let quote = normalise(&row.quote);
            // A quote that is a whole sentence names that sentence, even if longer ones
            // contain it (short sentences such as "turns").
            let exact = units.iter().filter(|u| **u == quote).count();
            let hits = if exact > 0 {
                exact
            } else {
                units.iter().filter(|u| u.contains(&quote)).count()
            };
            if hits == 0 {
                problems.push(format!(
                    "tests/claims.toml: {doc} \"{}\" matches no sentence of {doc} any more: \
                     update the quote to the sentence's new wording (or drop the row if the \
                     promise is gone)",
                    row.quote
                ));
            } else if hits > 1 {
                problems.push(format!(
                    "tests/claims.toml: {doc} \"{}\" matches {hits} sentences: quote more of \
                     the one you mean",
                    row.quote
                ));
            }
        }
        for unit in &units {
            let covered = rows.iter().any(|r| {
                let quote = normalise(&r.quote);
                *unit == quote || (!units.contains(&quote) && unit.contains(&quote))
            });
            if !covered {
                let quote: String = unit.chars().take(70).collect();
                problems.push(format!(
                    "{doc}: no test for \"{unit}\"\n  write a test that fails if this breaks, then add to \
                     tests/claims.toml:\n    [[claim]]\n    doc = \"{doc}\"\n    quote = {quote:?}\n    \
                     tests = [\"it::<module>::<test>\"]   # or: not_a_behaviour = \"<one word>\"",
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s) with the claim table ({} claim units, {} rows):\n{}",
        problems.len(),
        units_total,
        table.claim.len(),
        problems.join("\n")
    );
}

#[test]
fn every_test_the_table_names_exists() {
    let table = table();
    let problems: Vec<String> = table
        .claim
        .iter()
        .flat_map(|row| row.tests.iter())
        .filter_map(|t| test_exists(t).err())
        .collect();
    assert!(
        problems.is_empty(),
        "tests/claims.toml names tests that do not exist:\n{}",
        problems.join("\n")
    );
}

/// Known gaps: promises the table marks `untested`, printed with what their test would
/// need (run with `--nocapture`). Listing them cannot fail; adding a test and moving the row
/// to `tests = [...]` shrinks the list.
#[test]
fn the_untested_promises_are_listed() {
    let table = table();
    let gaps: Vec<&Row> = table
        .claim
        .iter()
        .filter(|r| r.untested.is_some())
        .collect();
    let tested = table.claim.iter().filter(|r| !r.tests.is_empty()).count();
    let marked = table
        .claim
        .iter()
        .filter(|r| r.not_a_behaviour.is_some())
        .count();
    println!(
        "{} rows: {tested} promises with tests, {} untested, {marked} not a behaviour",
        table.claim.len(),
        gaps.len()
    );
    for row in gaps {
        println!(
            "untested: {} \"{}\": {}",
            row.doc,
            row.quote,
            row.untested.as_deref().unwrap_or_default()
        );
    }
}

/// The checker itself: units are split as documented, and a sentence the table does not
/// cover would be reported (so the completeness test can fail).
#[test]
fn claim_units_are_sentences_of_prose_outside_code_and_tables() {
    let md = "# Title\n\nOne sentence. Another one, e.g. this.\n\n```sh\ncode. Not a claim.\n```\n\n\
              | a | b |\n| --- | --- |\n\n- **Item.** Its `x. Y` second part.\n  continues here\n1. Step one.\n";
    assert_eq!(
        claim_units(md),
        vec![
            "One sentence.",
            "Another one, e.g. this.",
            "**Item.** Its `x. Y` second part. continues here",
            "Step one.",
        ]
    );
    assert!(
        test_exists("claims::claim_units_are_sentences_of_prose_outside_code_and_tables").is_ok()
    );
    assert!(test_exists("claims::no_such_test").is_err());
    assert!(test_exists("it::delivery::no_such_test").is_err());
}

/// The targets of the inline Markdown links `[text](target)` of a text, outside fenced code
/// blocks and code spans, with their line numbers.
fn link_targets(markdown: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut in_code = false;
    for (n, line) in markdown.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let mut in_span = false;
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            match chars[i] {
                '`' => in_span = !in_span,
                ']' if !in_span && chars.get(i + 1) == Some(&'(') => {
                    if let Some(len) = chars[i + 2..].iter().position(|c| *c == ')') {
                        let target: String = chars[i + 2..i + 2 + len].iter().collect();
                        found.push((n + 1, target));
                        i += 2 + len;
                    }
                }
                _ => {}
            }
            i += 1;
        }
    }
    found
}

/// GitHub's (and mdBook's) id for a heading: lower case, punctuation other than `-` and `_`
/// left out, spaces as `-`.
fn heading_id(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The heading ids of a Markdown text (outside fenced code).
fn heading_ids(markdown: &str) -> Vec<String> {
    let mut in_code = false;
    let mut ids = Vec::new();
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            ids.push(heading_id(line.trim_start_matches('#')));
        }
    }
    ids
}

/// Every relative link of README.md and docs/*.md (SUMMARY.md included) names a file or
/// directory that exists, and an `#anchor` into a Markdown file names one of its headings;
/// a page moved or renamed fails here with the link to fix.
#[test]
fn every_relative_link_in_the_docs_resolves() {
    let mut files = vec!["README.md".to_owned()];
    files.extend(docs_pages());
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in &files {
        let path = repo().join(file);
        let text = read(&path);
        let dir = path.parent().unwrap();
        for (line, target) in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (target_path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let resolved = if target_path.is_empty() {
                path.clone()
            } else {
                dir.join(target_path)
            };
            if !resolved.exists() {
                problems.push(format!("{file}:{line}: ({target}) names no file"));
                continue;
            }
            let is_markdown = resolved.extension().is_some_and(|e| e == "md");
            if let Some(anchor) = anchor.filter(|_| is_markdown)
                && !heading_ids(&read(&resolved)).iter().any(|id| id == anchor)
            {
                problems.push(format!(
                    "{file}:{line}: ({target}) names no heading of {}",
                    resolved.strip_prefix(repo()).unwrap_or(&resolved).display()
                ));
            }
        }
    }
    assert!(
        checked > 10,
        "only {checked} relative links found: is the scan broken?"
    );
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems.join("\n")
    );
}

/// The book has every page: each docs/*.md but SUMMARY.md itself is linked from SUMMARY.md
/// (mdBook leaves out, silently, a page its summary does not list).
#[test]
fn the_book_summary_lists_every_page_under_docs() {
    let summary = read(&repo().join(SUMMARY));
    let listed: Vec<String> = link_targets(&summary)
        .into_iter()
        .map(|(_, t)| format!("docs/{t}"))
        .collect();
    let missing: Vec<String> = docs_pages()
        .into_iter()
        .filter(|p| p != SUMMARY && !listed.contains(p))
        .collect();
    assert!(
        missing.is_empty(),
        "{SUMMARY} does not list {missing:?}: add a `- [Title](<page>.md)` line for each"
    );
}

/// The link scanner and heading ids the link test relies on.
#[test]
fn links_and_heading_ids_are_read_as_github_renders_them() {
    let md = "See [a](a.md#the-b-c) and `[no](code.md)`.\n```\n[no](fenced.md)\n```\n[c](https://x.org/y)";
    assert_eq!(
        link_targets(md),
        vec![
            (1, "a.md#the-b-c".to_owned()),
            (5, "https://x.org/y".to_owned())
        ]
    );
    assert_eq!(heading_id(" The `b`, c!"), "the-b-c");
    assert_eq!(
        heading_id("Least-privilege ACL user"),
        "least-privilege-acl-user"
    );
}

/// README: "The pages under `docs/` are also a book: `mdbook build` (from the repository
/// root) writes it to `target/book/`" — book.toml says so, the output stays out of git, and
/// `scripts/test` builds it (so a page mdBook cannot render fails CI).
#[test]
fn the_book_is_built_from_docs_into_target_book_by_scripts_test() {
    let book: toml::Table =
        toml::from_str(&read(&repo().join("book.toml"))).expect("book.toml parses");
    let at = |section: &str, key: &str| {
        book.get(section)
            .and_then(|s| s.get(key))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    assert_eq!(at("book", "src").as_deref(), Some("docs"), "{book:?}");
    assert_eq!(
        at("build", "build-dir").as_deref(),
        Some("target/book"),
        "{book:?}"
    );
    assert!(
        read(&repo().join(".gitignore"))
            .lines()
            .any(|l| l.trim() == "/target"),
        "target/ (and with it the book) is git-ignored"
    );
    let script = read(&repo().join("scripts/test"));
    assert!(
        script
            .lines()
            .any(|l| l.trim_start().starts_with("mdbook build")),
        "scripts/test runs `mdbook build`:\n{script}"
    );
}
