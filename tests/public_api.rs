//! The extension API is a boundary: the items a handler crate can use are listed in
//! `tests/public_api.txt`, and none of them is a Redis client type, the runtime's
//! internals or the supervisor.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The names in the extension API's `pub use streamworker_handlers::{…}` of src/lib.rs,
/// `App`, and `App`'s public methods.
fn exported() -> Vec<String> {
    let lib = read("src/lib.rs");
    let start = lib
        .find("// The extension API")
        .expect("src/lib.rs marks the extension API");
    let block = &lib[start..];
    let open = block
        .find("pub use streamworker_handlers::{")
        .expect("its re-exports");
    let close = block[open..].find("};").expect("closed") + open;
    let mut names: Vec<String> = block[open + "pub use streamworker_handlers::{".len()..close]
        .split(',')
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty())
        .collect();
    assert!(
        lib.contains("pub use app::App;"),
        "src/lib.rs re-exports App"
    );
    names.push("App".into());
    let app = read("src/app.rs");
    let body = &app[app.find("impl App {").expect("impl App")..];
    let body = &body[..body.find("\n}\n").expect("end of impl App")];
    for line in body.lines() {
        if let Some(rest) = line.trim().strip_prefix("pub fn ") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            names.push(format!("App::{name}"));
        }
    }
    names.sort();
    names
}

#[test]
fn the_extension_api_is_the_checked_in_list() {
    let mut listed: Vec<String> = read("tests/public_api.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    listed.sort();
    let exported = exported();
    let added: Vec<&String> = exported.iter().filter(|n| !listed.contains(n)).collect();
    let removed: Vec<&String> = listed.iter().filter(|n| !exported.contains(n)).collect();
    assert!(
        added.is_empty() && removed.is_empty(),
        "the extension API changed: added {added:?}, removed {removed:?}; if that is deliberate, update tests/public_api.txt"
    );
}

/// Every Rust file below `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out
}

#[test]
fn the_extension_api_exposes_no_redis_runtime_or_supervisor_type() {
    // Every re-exported item comes from the handlers crate, which cannot name a redis-rs
    // type: it does not depend on redis-rs at all.
    let manifest: toml::Table = read("handlers/Cargo.toml").parse().unwrap();
    for section in ["dependencies", "dev-dependencies"] {
        if let Some(deps) = manifest.get(section).and_then(|d| d.as_table()) {
            assert!(
                !deps.keys().any(|k| k.starts_with("redis")),
                "handlers/Cargo.toml [{section}] names redis-rs: the extension API would be able to expose its types"
            );
        }
    }
    for file in rust_files(&repo().join("handlers/src")) {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains("redis::") && !text.contains("crate::supervisor"),
            "{} names redis:: or the supervisor",
            file.display()
        );
    }
    // App's public signatures name only the extension API and std.
    let app = read("src/app.rs");
    for line in app.lines().filter(|l| l.trim_start().starts_with("pub fn")) {
        for internal in [
            "redis",
            "tokio",
            "supervisor",
            "consumer",
            "client",
            "Config",
            "Launch",
        ] {
            assert!(
                !line.contains(internal),
                "App's public signature names {internal}: {line}"
            );
        }
    }
}

/// A handler written against the listed items alone compiles and runs (the guide's shape).
#[test]
fn a_handler_needs_nothing_but_the_extension_api() {
    use std::sync::Arc;

    use streamworker::{
        BuildError, Effect, Effects, Entry, EntryId, Handler, HandlerContext, HandlerError,
        HandlerKind, HandlerOptions, MemoryStore, Origin, Store,
    };

    #[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
    struct Options {
        key: String,
    }
    impl HandlerOptions for Options {}

    struct Count(String);
    impl Handler for Count {
        async fn handle(&self, entry: &Entry) -> Result<Effects, HandlerError> {
            if entry.delivery_count > 1 {
                return Err(HandlerError::drop_entry("counted already"));
            }
            Ok(vec![Effect::HashIncr {
                key: self.0.clone(),
                field: entry.stream().to_owned(),
                by: 1,
            }])
        }
    }
    impl HandlerKind for Count {
        type Options = Options;
        fn build(options: &Options, _: &HandlerContext) -> Result<Self, BuildError> {
            Ok(Count(options.key.clone()))
        }
    }

    let store = Arc::new(MemoryStore::new());
    let context = HandlerContext::new("s", "g", store.clone());
    let handler = Count::build(&Options { key: "k".into() }, &context).unwrap();
    let origin = Arc::new(Origin {
        stream: "s".into(),
        group: "g".into(),
        consumer: "c".into(),
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let first = Entry::new(Arc::clone(&origin), EntryId::new(1, 0), 1, Vec::new());
        store
            .apply(handler.handle(&first).await.unwrap())
            .await
            .unwrap();
        let again = Entry::new(origin, EntryId::new(1, 0), 2, Vec::new());
        assert!(matches!(
            handler.handle(&again).await,
            Err(HandlerError::Drop(_))
        ));
    });
    assert_eq!(store.hash("k")["s"], "1");
}
