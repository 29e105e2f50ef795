//! What can be checked of `deploy/`, the `Dockerfile` and `.dockerignore` without a
//! container engine or a cluster: that the files parse, that they agree with each other and
//! with the daemon (ports, paths, durations, group names, environment overrides), that the
//! configurations they ship pass `streamworker check`, and that the image's HEALTHCHECK
//! command tells a healthy daemon from an unhealthy one. Also that the defaults tables of
//! docs/configuration.md are what `check` resolves for a minimal configuration, and that
//! README's first configuration is valid as written.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use yaml_rust2::Yaml;

use common::{
    Daemon, Redis, daemon_env, free_port, promtool, read, repo, require_promtool, yaml_docs,
};

// ---- files ---------------------------------------------------------------------------------

/// Every `.yml`/`.yaml` file below `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yml" | "yaml")
            ) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

// ---- YAML access ---------------------------------------------------------------------------

/// The node at a dotted path, or a panic naming the path.
fn at<'a>(y: &'a Yaml, path: &str) -> &'a Yaml {
    opt(y, path).unwrap_or_else(|| panic!("`{path}` is missing in {}", describe(y)))
}

fn opt<'a>(y: &'a Yaml, path: &str) -> Option<&'a Yaml> {
    let mut node = y;
    for key in path.split('.') {
        node = &node[key];
        if node.is_badvalue() || node.is_null() {
            return None;
        }
    }
    Some(node)
}

/// `map[key]` of the mapping at `path`, for keys that contain dots (`streamworker.toml`).
fn entry<'a>(y: &'a Yaml, path: &str, key: &str) -> Option<&'a Yaml> {
    let node = &opt(y, path)?[key];
    (!node.is_badvalue() && !node.is_null()).then_some(node)
}

fn str_at<'a>(y: &'a Yaml, path: &str) -> &'a str {
    at(y, path)
        .as_str()
        .unwrap_or_else(|| panic!("`{path}` is not a string in {}", describe(y)))
}

fn list_at<'a>(y: &'a Yaml, path: &str) -> &'a [Yaml] {
    at(y, path)
        .as_vec()
        .unwrap_or_else(|| panic!("`{path}` is not a list in {}", describe(y)))
}

/// A scalar as text, whatever YAML typed it as (`port: 9464`, `value: "1"`, `replicas: 3`).
fn scalar(y: &Yaml) -> String {
    match y {
        Yaml::String(s) | Yaml::Real(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        other => panic!("expected a scalar, found {other:?}"),
    }
}

fn string_map(y: &Yaml) -> BTreeMap<String, String> {
    y.as_hash()
        .unwrap_or_else(|| panic!("expected a mapping, found {y:?}"))
        .iter()
        .map(|(k, v)| (scalar(k), scalar(v)))
        .collect()
}

fn describe(y: &Yaml) -> String {
    match (
        y["kind"].as_str(),
        opt(y, "metadata.name").and_then(Yaml::as_str),
    ) {
        (Some(kind), Some(name)) => format!("{kind} {name}"),
        _ => "the document".into(),
    }
}

// ---- the Kubernetes manifests -------------------------------------------------------------

const KUBE_DIR: &str = "deploy/kubernetes";
/// Examples beside the manifests, which `kubectl apply -k` leaves out (a second
/// ScaledObject for the same Deployment, say): checked on their own.
const KUBE_EXAMPLES: &str = "examples";

/// The manifests `kubectl apply -k deploy/kubernetes` may apply: every YAML file there but
/// the kustomization and the examples.
fn kube_manifests() -> Vec<PathBuf> {
    let dir = repo().join(KUBE_DIR);
    yaml_files(&dir)
        .into_iter()
        .filter(|p| {
            let relative = p.strip_prefix(&dir).unwrap();
            relative != Path::new("kustomization.yaml") && !relative.starts_with(KUBE_EXAMPLES)
        })
        .collect()
}

struct Kube {
    objects: Vec<Yaml>,
}

impl Kube {
    fn load() -> Self {
        let objects = kube_manifests().iter().flat_map(|p| yaml_docs(p)).collect();
        Self { objects }
    }

    fn all(&self, kind: &str) -> Vec<&Yaml> {
        self.objects
            .iter()
            .filter(|o| o["kind"].as_str() == Some(kind))
            .collect()
    }

    fn one(&self, kind: &str) -> &Yaml {
        match self.all(kind).as_slice() {
            [one] => one,
            other => panic!("expected one {kind} in {KUBE_DIR}, found {}", other.len()),
        }
    }

    fn named(&self, kind: &str, name: &str) -> &Yaml {
        self.all(kind)
            .into_iter()
            .find(|o| opt(o, "metadata.name").and_then(Yaml::as_str) == Some(name))
            .unwrap_or_else(|| panic!("no {kind} named {name:?} in {KUBE_DIR}"))
    }

    fn deployment(&self) -> &Yaml {
        self.one("Deployment")
    }

    /// The streamworker container of the Deployment.
    fn container(&self) -> &Yaml {
        let containers = list_at(self.deployment(), "spec.template.spec.containers");
        containers
            .iter()
            .find(|c| c["name"].as_str() == Some("streamworker"))
            .unwrap_or_else(|| panic!("the Deployment has no container named streamworker"))
    }

    /// The (volume, file inside it) that provides `path` in the container: a volumeMount
    /// whose mountPath is `path` (with subPath) or one of its parents.
    fn file_source(&self, path: &str) -> (&Yaml, String) {
        let mounts = list_at(self.container(), "volumeMounts");
        let (mount, inside) = mounts
            .iter()
            .find_map(|m| {
                let mount_path = str_at(m, "mountPath").trim_end_matches('/');
                if let Some(sub) = opt(m, "subPath") {
                    (mount_path == path).then(|| (m, scalar(sub)))
                } else {
                    path.strip_prefix(&format!("{mount_path}/"))
                        .map(|rest| (m, rest.to_owned()))
                }
            })
            .unwrap_or_else(|| {
                panic!("no volumeMount of the streamworker container provides {path}")
            });
        let name = str_at(mount, "name");
        let volume = list_at(self.deployment(), "spec.template.spec.volumes")
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("the volumeMount {name:?} names no volume of the pod"));
        (volume, inside)
    }

    /// The key of a ConfigMap or Secret volume that appears as `file` inside it.
    fn key_for(volume: &Yaml, source: &str, file: &str) -> String {
        match opt(volume, &format!("{source}.items")) {
            Some(items) => items
                .as_vec()
                .expect("items is a list")
                .iter()
                .find(|i| str_at(i, "path") == file)
                .map(|i| str_at(i, "key").to_owned())
                .unwrap_or_else(|| {
                    panic!(
                        "no item of volume {:?} becomes the file {file:?}",
                        scalar(&volume["name"])
                    )
                }),
            None => file.to_owned(),
        }
    }

    /// Where the daemon reads its configuration in the pod: `-c` in the args, else the
    /// container's STREAMWORKER_CONFIG, else the image's.
    fn config_path(&self) -> String {
        let args: Vec<String> = opt(self.container(), "args")
            .and_then(Yaml::as_vec)
            .map(|a| a.iter().map(scalar).collect())
            .unwrap_or_default();
        if let Some(i) = args.iter().position(|a| a == "-c" || a == "--config") {
            return args[i + 1].clone();
        }
        if let Some(value) = self.plain_env().get("STREAMWORKER_CONFIG") {
            return value.clone();
        }
        Dockerfile::load().env("STREAMWORKER_CONFIG")
    }

    /// The container's environment variables with literal values.
    fn plain_env(&self) -> BTreeMap<String, String> {
        opt(self.container(), "env")
            .and_then(Yaml::as_vec)
            .into_iter()
            .flatten()
            .filter_map(|e| Some((str_at(e, "name").to_owned(), scalar(opt(e, "value")?))))
            .collect()
    }

    /// The container's environment as the kubelet would set it in a pod named `pod`:
    /// downward-API fields and Secret keys resolved from the manifests.
    fn pod_env(&self, pod: &str) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for e in opt(self.container(), "env")
            .and_then(Yaml::as_vec)
            .into_iter()
            .flatten()
        {
            let name = str_at(e, "name").to_owned();
            let value = if let Some(v) = opt(e, "value") {
                scalar(v)
            } else if let Some(field) = opt(e, "valueFrom.fieldRef.fieldPath") {
                match field.as_str() {
                    Some("metadata.name") => pod.to_owned(),
                    other => panic!("{name}: fieldRef {other:?} is not simulated by this test"),
                }
            } else if let Some(r) = opt(e, "valueFrom.secretKeyRef") {
                self.secret_value(str_at(r, "name"), str_at(r, "key"))
            } else {
                panic!("{name}: unsupported env source {e:?}");
            };
            env.insert(name, value);
        }
        env
    }

    /// A Secret's value for `key` (stringData in clear, data as a stand-in).
    fn secret_value(&self, secret: &str, key: &str) -> String {
        let s = self.named("Secret", secret);
        if let Some(v) = entry(s, "stringData", key) {
            scalar(v)
        } else if entry(s, "data", key).is_some() {
            "value-from-secret-data".into()
        } else {
            panic!("Secret {secret} has no key {key:?}")
        }
    }

    /// The streamworker TOML of the ConfigMap the Deployment mounts at its config path.
    fn config_text(&self) -> String {
        let path = self.config_path();
        let (volume, file) = self.file_source(&path);
        let cm_name = opt(volume, "configMap.name")
            .and_then(Yaml::as_str)
            .unwrap_or_else(|| panic!("{path} is not mounted from a ConfigMap: {volume:?}"));
        let key = Self::key_for(volume, "configMap", &file);
        let cm = self.named("ConfigMap", cm_name);
        entry(cm, "data", &key)
            .and_then(Yaml::as_str)
            .unwrap_or_else(|| panic!("ConfigMap {cm_name} has no data key {key:?}"))
            .to_owned()
    }

    fn config(&self) -> toml::Table {
        parse_toml("the ConfigMap's streamworker.toml", &self.config_text())
    }

    fn pod_labels(&self) -> BTreeMap<String, String> {
        string_map(at(self.deployment(), "spec.template.metadata.labels"))
    }

    /// A probe's or Service's port (a number or the name of a container port) as a number.
    fn resolve_port(&self, port: &Yaml) -> u16 {
        match port {
            Yaml::Integer(n) => u16::try_from(*n).expect("a port number"),
            Yaml::String(name) => list_at(self.container(), "ports")
                .iter()
                .find(|p| p["name"].as_str() == Some(name))
                .map(|p| at(p, "containerPort").as_i64().expect("containerPort") as u16)
                .unwrap_or_else(|| panic!("no container port is named {name:?}")),
            other => panic!("not a port: {other:?}"),
        }
    }
}

fn parse_toml(what: &str, text: &str) -> toml::Table {
    text.parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("{what} is not valid TOML: {e}"))
}

fn toml_str<'a>(t: &'a toml::Table, path: &str) -> Option<&'a str> {
    let mut keys = path.split('.');
    let mut value = t.get(keys.next()?)?;
    for key in keys {
        value = value.as_table()?.get(key)?;
    }
    value.as_str()
}

fn duration(t: &toml::Table, key: &str, default: &str) -> Duration {
    let text = toml_str(t, key).unwrap_or(default);
    humantime::parse_duration(text).unwrap_or_else(|e| panic!("{key} = {text:?}: {e}"))
}

fn listen_port(t: &toml::Table) -> u16 {
    let listen = toml_str(t, "http.listen").unwrap_or("0.0.0.0:9464");
    listen
        .parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("http.listen = {listen:?}: {e}"))
        .port()
}

/// `redis://[user:password@]host:port/db` → (host, port, db).
fn redis_address(url: &str) -> (String, u16, u32) {
    let rest = url
        .strip_prefix("redis://")
        .unwrap_or_else(|| panic!("{url}: expected a redis:// URL"));
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = host_port.rsplit_once(':').unwrap_or((host_port, "6379"));
    let db = if path.is_empty() { "0" } else { path };
    (
        host.to_owned(),
        port.parse().expect("a port"),
        db.parse().expect("a database index"),
    )
}

/// The configured groups as name → stream.
fn groups(t: &toml::Table) -> BTreeMap<String, String> {
    t.get("groups")
        .and_then(toml::Value::as_table)
        .expect("a [groups] table")
        .iter()
        .map(|(name, g)| {
            let stream = g
                .get("stream")
                .and_then(toml::Value::as_str)
                .expect("stream");
            (name.clone(), stream.to_owned())
        })
        .collect()
}

// ---- the Dockerfile ------------------------------------------------------------------------

struct Instruction {
    /// The index of the stage (FROM) it belongs to.
    stage: usize,
    /// Upper-case: COPY, RUN, …
    op: String,
    args: String,
}

struct Dockerfile {
    instructions: Vec<Instruction>,
    /// (image, name) of every FROM.
    stages: Vec<(String, Option<String>)>,
}

impl Dockerfile {
    fn load() -> Self {
        let text = read("Dockerfile");
        let mut logical = Vec::new();
        let mut current = String::new();
        for line in text.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
                continue;
            }
            match trimmed.strip_suffix('\\') {
                Some(head) => {
                    current.push_str(head);
                    current.push(' ');
                }
                None => {
                    current.push_str(trimmed);
                    logical.push(std::mem::take(&mut current));
                }
            }
        }
        assert!(
            current.is_empty(),
            "the Dockerfile ends in a line continuation"
        );
        let mut instructions = Vec::new();
        let mut stages = Vec::new();
        for line in logical {
            let (op, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
            let op = op.to_ascii_uppercase();
            let args = args.trim().to_owned();
            if op == "FROM" {
                let words: Vec<&str> = args.split_whitespace().collect();
                let image = words
                    .iter()
                    .find(|w| !w.starts_with("--"))
                    .expect("FROM names an image")
                    .to_string();
                let name = words
                    .iter()
                    .position(|w| w.eq_ignore_ascii_case("as"))
                    .map(|i| words[i + 1].to_owned());
                stages.push((image, name));
            }
            instructions.push(Instruction {
                stage: stages.len().saturating_sub(1),
                op,
                args,
            });
        }
        assert!(!stages.is_empty(), "the Dockerfile has no FROM");
        Self {
            instructions,
            stages,
        }
    }

    fn in_stage(&self, stage: usize) -> impl Iterator<Item = (usize, &Instruction)> {
        self.instructions
            .iter()
            .enumerate()
            .filter(move |(_, i)| i.stage == stage && i.op != "FROM")
    }

    fn final_stage(&self) -> usize {
        self.stages.len() - 1
    }

    /// The last value of one of `op`'s instructions in the final stage.
    fn last(&self, op: &str) -> Option<&str> {
        self.in_stage(self.final_stage())
            .filter(|(_, i)| i.op == op)
            .last()
            .map(|(_, i)| i.args.as_str())
    }

    /// An ENV of the final stage (`ENV KEY=value` or `ENV KEY value`).
    fn env(&self, key: &str) -> String {
        let mut found = None;
        for (_, i) in self
            .in_stage(self.final_stage())
            .filter(|(_, i)| i.op == "ENV")
        {
            if let Some(rest) = i.args.strip_prefix(&format!("{key} ")) {
                found = Some(rest.trim().to_owned());
            }
            for word in i.args.split_whitespace() {
                if let Some(v) = word.strip_prefix(&format!("{key}=")) {
                    found = Some(v.trim_matches('"').to_owned());
                }
            }
        }
        found.unwrap_or_else(|| panic!("the image sets no ENV {key}"))
    }

    fn exec_form(what: &str, args: &str) -> Vec<String> {
        serde_json::from_str(args)
            .unwrap_or_else(|e| panic!("{what} is not in exec form (a JSON array): {args}: {e}"))
    }

    /// The HEALTHCHECK command (exec form).
    fn healthcheck(&self) -> Vec<String> {
        let args = self
            .last("HEALTHCHECK")
            .expect("the image has a HEALTHCHECK");
        let cmd = args
            .find("CMD ")
            .unwrap_or_else(|| panic!("HEALTHCHECK without CMD: {args}"));
        Self::exec_form("HEALTHCHECK CMD", &args[cmd + 4..])
    }

    /// The final stage's `USER` as numeric (uid, gid).
    fn user(&self) -> (u32, u32) {
        let user = self.last("USER").expect("the image sets a USER");
        let (uid, gid) = user.split_once(':').unwrap_or((user, user));
        let number = |what: &str, v: &str| {
            v.parse::<u32>().unwrap_or_else(|_| {
                panic!("USER {user}: the {what} is not numeric (runAsNonRoot needs a number)")
            })
        };
        (number("uid", uid), number("gid", gid))
    }

    /// The final stage's working directory.
    fn workdir(&self) -> String {
        self.last("WORKDIR")
            .expect("the image sets a WORKDIR")
            .trim_end_matches('/')
            .to_owned()
    }

    /// The final stage's `VOLUME`s (JSON or plain form).
    fn volumes(&self) -> Vec<String> {
        self.in_stage(self.final_stage())
            .filter(|(_, i)| i.op == "VOLUME")
            .flat_map(|(_, i)| {
                serde_json::from_str::<Vec<String>>(&i.args)
                    .unwrap_or_else(|_| i.args.split_whitespace().map(str::to_owned).collect())
            })
            .map(|v| v.trim_end_matches('/').to_owned())
            .collect()
    }

    /// Every FROM's image with the global ARGs' defaults (those before the first FROM)
    /// substituted, leaving out references to earlier stages.
    fn base_images(&self) -> Vec<String> {
        let mut args = BTreeMap::new();
        for i in self.instructions.iter().take_while(|i| i.op != "FROM") {
            if i.op == "ARG"
                && let Some((k, v)) = i.args.split_once('=')
            {
                args.insert(k.trim().to_owned(), v.trim().trim_matches('"').to_owned());
            }
        }
        let mut images = Vec::new();
        for (n, (image, _)) in self.stages.iter().enumerate() {
            if self.stages[..n]
                .iter()
                .any(|(_, name)| name.as_deref() == Some(image.as_str()))
            {
                continue;
            }
            let mut image = image.clone();
            for (k, v) in &args {
                image = image
                    .replace(&format!("${{{k}}}"), v)
                    .replace(&format!("${k}"), v);
            }
            assert!(
                !image.contains('$'),
                "FROM {image}: an ARG without a default"
            );
            images.push(image);
        }
        images
    }

    /// The build stage's `COPY` sources from the context (not `--from`), in order, with
    /// the instruction's index.
    fn context_copies(&self) -> Vec<(usize, String)> {
        let mut copies = Vec::new();
        for (index, i) in self.instructions.iter().enumerate() {
            if i.op != "COPY" && i.op != "ADD" {
                continue;
            }
            let words: Vec<&str> = i.args.split_whitespace().collect();
            if words.iter().any(|w| w.starts_with("--from")) {
                continue;
            }
            let paths: Vec<&str> = words.into_iter().filter(|w| !w.starts_with("--")).collect();
            for source in &paths[..paths.len() - 1] {
                copies.push((index, source.trim_end_matches('/').to_owned()));
            }
        }
        copies
    }
}

/// The binary `cargo build --release` names after the package, or the `[[bin]]` named so.
fn cargo_binary_name() -> String {
    let manifest = parse_toml("Cargo.toml", &read("Cargo.toml"));
    let package = toml_str(&manifest, "package.name").expect("package.name");
    let bins: Vec<String> = manifest
        .get("bin")
        .and_then(toml::Value::as_array)
        .map(|bins| {
            bins.iter()
                .filter_map(|b| b.get("name").and_then(toml::Value::as_str))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if bins.is_empty() || bins.iter().any(|b| b == package) {
        package.to_owned()
    } else {
        panic!("Cargo.toml declares binaries {bins:?} but none named after the package")
    }
}

fn workspace_members() -> Vec<String> {
    let manifest = parse_toml("Cargo.toml", &read("Cargo.toml"));
    manifest
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(toml::Value::as_array)
        .map(|m| {
            m.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

// ---- .dockerignore --------------------------------------------------------------------------

/// Whether the build context leaves `path` out, following Docker's rules: patterns are
/// relative to the context, match a path or any of its parents, `*` within a segment,
/// `**` across segments, `!` re-includes, the last matching pattern wins.
fn dockerignored(patterns: &[String], path: &str) -> bool {
    let segments: Vec<&str> = path.split('/').collect();
    let mut excluded = false;
    for pattern in patterns {
        let (negated, pattern) = match pattern.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, pattern.as_str()),
        };
        let pattern: Vec<&str> = pattern
            .trim_start_matches('/')
            .trim_end_matches('/')
            .split('/')
            .collect();
        let matches = (1..=segments.len()).any(|n| glob(&pattern, &segments[..n]));
        if matches {
            excluded = !negated;
        }
    }
    excluded
}

fn glob(pattern: &[&str], path: &[&str]) -> bool {
    match (pattern.first(), path.first()) {
        (None, None) => true,
        (Some(&"**"), _) => {
            glob(&pattern[1..], path) || (!path.is_empty() && glob(pattern, &path[1..]))
        }
        (Some(p), Some(s)) => {
            segment_glob(p.as_bytes(), s.as_bytes()) && glob(&pattern[1..], &path[1..])
        }
        _ => false,
    }
}

fn segment_glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => segment_glob(&p[1..], s) || (!s.is_empty() && segment_glob(p, &s[1..])),
        (Some(b'?'), Some(_)) => segment_glob(&p[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => segment_glob(&p[1..], &s[1..]),
        _ => false,
    }
}

fn dockerignore() -> Vec<String> {
    read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

// ---- docker-compose -------------------------------------------------------------------------

const COMPOSE_DIR: &str = "deploy/compose";

struct Compose {
    doc: Yaml,
}

impl Compose {
    fn load() -> Self {
        let docs = yaml_docs(&repo().join(COMPOSE_DIR).join("docker-compose.yml"));
        let [doc] = <[Yaml; 1]>::try_from(docs).expect("docker-compose.yml is one document");
        Self { doc }
    }

    fn services(&self) -> Vec<(String, &Yaml)> {
        at(&self.doc, "services")
            .as_hash()
            .expect("services is a mapping")
            .iter()
            .map(|(k, v)| (scalar(k), v))
            .collect()
    }

    fn service(&self, name: &str) -> &Yaml {
        self.services()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
            .unwrap_or_else(|| panic!("docker-compose.yml has no service {name:?}"))
    }

    /// Services built from the repository's Dockerfile.
    fn replicas(&self) -> Vec<(String, &Yaml)> {
        self.services()
            .into_iter()
            .filter(|(_, s)| {
                let Some(build) = opt(s, "build") else {
                    return false;
                };
                let (context, dockerfile) = match build {
                    Yaml::String(c) => (c.clone(), "Dockerfile".to_owned()),
                    b => (
                        str_at(b, "context").to_owned(),
                        opt(b, "dockerfile").map_or("Dockerfile".into(), scalar),
                    ),
                };
                normalize(&repo().join(COMPOSE_DIR).join(&context)) == normalize(&repo())
                    && dockerfile == "Dockerfile"
            })
            .collect()
    }

    fn environment(service: &Yaml) -> BTreeMap<String, String> {
        match opt(service, "environment") {
            None => BTreeMap::new(),
            Some(Yaml::Array(list)) => list
                .iter()
                .map(|item| {
                    let item = scalar(item);
                    let (k, v) = item.split_once('=').unwrap_or((&item, ""));
                    (k.to_owned(), v.to_owned())
                })
                .collect(),
            Some(map) => string_map(map),
        }
    }

    /// Short-syntax volumes as (source, target, options).
    fn volumes(service: &Yaml) -> Vec<(String, String, String)> {
        opt(service, "volumes")
            .and_then(Yaml::as_vec)
            .into_iter()
            .flatten()
            .map(|v| {
                let v = scalar(v);
                let mut parts = v.splitn(3, ':').map(str::to_owned);
                (
                    parts.next().unwrap_or_default(),
                    parts.next().unwrap_or_default(),
                    parts.next().unwrap_or_default(),
                )
            })
            .collect()
    }

    fn command(service: &Yaml) -> Vec<String> {
        match opt(service, "command") {
            Some(Yaml::Array(words)) => words.iter().map(scalar).collect(),
            Some(s) => scalar(s).split_whitespace().map(str::to_owned).collect(),
            None => Vec::new(),
        }
    }
}

/// `a/b/../c` → `a/c`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

fn compose_config() -> toml::Table {
    parse_toml(
        "deploy/compose/streamworker.toml",
        &read("deploy/compose/streamworker.toml"),
    )
}

// ---- running the binary ---------------------------------------------------------------------

/// `streamworker check -c FILE` with exactly `env` (nothing inherited).
fn check(file: &Path, env: &BTreeMap<String, String>) -> Output {
    Command::new(env!("CARGO_BIN_EXE_streamworker"))
        .args(["check", "-c"])
        .arg(file)
        .env_clear()
        .envs(env)
        .output()
        .expect("run streamworker check")
}

/// Runs `check` and returns the resolved configuration it prints.
fn check_passes(what: &str, file: &Path, env: &BTreeMap<String, String>) -> toml::Table {
    let out = check(file, env);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "`streamworker check` rejects {what} ({:?}) with env {env:?}:\n{stderr}",
        out.status
    );
    parse_toml("the configuration `check` prints", &stdout)
}

/// Asserts that every `STREAMWORKER__A__B` of `env` shows up resolved at `a.b` in the
/// configuration `check` printed (its value, or `<redacted>` for a secret).
fn assert_overrides_applied(what: &str, env: &BTreeMap<String, String>, resolved: &toml::Table) {
    for (name, value) in env {
        let Some(path) = name.strip_prefix("STREAMWORKER__") else {
            continue;
        };
        let key = path
            .split("__")
            .collect::<Vec<_>>()
            .join(".")
            .to_lowercase();
        let shown = toml_str(resolved, &key)
            .unwrap_or_else(|| panic!("{what}: {name} does not reach `{key}`: {resolved:#?}"));
        assert!(
            shown == value || shown == "<redacted>",
            "{what}: {name} = {value:?} but `{key}` resolved to {shown:?}"
        );
    }
}

/// Runs the image's HEALTHCHECK command (its program is the image's binary, here the one
/// cargo built) with exactly `env`; its exit code and stderr.
fn run_healthcheck(command: &[String], env: &BTreeMap<String, String>) -> (Option<i32>, String) {
    assert_eq!(
        command[0], "/usr/local/bin/streamworker",
        "the HEALTHCHECK runs something other than the image's binary"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_streamworker"))
        .args(&command[1..])
        .env_clear()
        .envs(env)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the HEALTHCHECK command {command:?}: {e}"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---- the tests ------------------------------------------------------------------------------

#[test]
fn every_yaml_file_under_deploy_parses() {
    let files = yaml_files(&repo().join("deploy"));
    for expected in [
        "deploy/kubernetes/kustomization.yaml",
        "deploy/kubernetes/configmap.yaml",
        "deploy/kubernetes/secret.yaml",
        "deploy/kubernetes/deployment.yaml",
        "deploy/kubernetes/service.yaml",
        "deploy/kubernetes/pdb.yaml",
        "deploy/kubernetes/keda-scaledobject.yaml",
        "deploy/compose/docker-compose.yml",
        "deploy/compose/prometheus.yml",
    ] {
        assert!(
            files.contains(&repo().join(expected)),
            "{expected} is missing"
        );
    }
    for file in &files {
        let docs = yaml_docs(file);
        assert!(!docs.is_empty(), "{} holds no document", file.display());
        for doc in &docs {
            assert!(
                doc.as_hash().is_some(),
                "{}: a document that is not a mapping: {doc:?}",
                file.display()
            );
        }
    }
}

#[test]
fn the_kustomization_lists_every_manifest_and_each_kind_has_its_api_version() {
    let dir = repo().join(KUBE_DIR);
    let kustomization = yaml_docs(&dir.join("kustomization.yaml")).remove(0);
    assert_eq!(str_at(&kustomization, "kind"), "Kustomization");
    let listed: BTreeSet<String> = list_at(&kustomization, "resources")
        .iter()
        .map(scalar)
        .collect();
    let present: BTreeSet<String> = kube_manifests()
        .iter()
        .map(|p| p.strip_prefix(&dir).unwrap().display().to_string())
        .collect();
    assert_eq!(
        listed, present,
        "kustomization.yaml `resources` vs the files in {KUBE_DIR}"
    );

    let api_versions: BTreeMap<&str, &str> = [
        ("Namespace", "v1"),
        ("ConfigMap", "v1"),
        ("Secret", "v1"),
        ("Service", "v1"),
        ("Deployment", "apps/v1"),
        ("PodDisruptionBudget", "policy/v1"),
        ("ScaledObject", "keda.sh/v1alpha1"),
        ("TriggerAuthentication", "keda.sh/v1alpha1"),
    ]
    .into();
    let kube = Kube::load();
    let mut kinds = BTreeSet::new();
    for o in &kube.objects {
        let kind = str_at(o, "kind");
        let expected = api_versions
            .get(kind)
            .unwrap_or_else(|| panic!("unexpected kind {kind:?} in {KUBE_DIR}"));
        assert_eq!(
            str_at(o, "apiVersion"),
            *expected,
            "apiVersion of {}",
            describe(o)
        );
        assert!(!str_at(o, "metadata.name").is_empty());
        kinds.insert(kind);
    }
    for required in [
        "ConfigMap",
        "Secret",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "ScaledObject",
        "TriggerAuthentication",
    ] {
        assert!(kinds.contains(required), "{KUBE_DIR} has no {required}");
    }
}

#[test]
fn the_deployment_mounts_its_configuration_where_the_daemon_reads_it() {
    let kube = Kube::load();
    let dockerfile = Dockerfile::load();
    // The image reads the configuration from STREAMWORKER_CONFIG; the pod must put the
    // ConfigMap's TOML exactly there (config_text follows mount → volume → ConfigMap key).
    assert_eq!(
        kube.config_path(),
        dockerfile.env("STREAMWORKER_CONFIG"),
        "the pod should rely on the image's STREAMWORKER_CONFIG"
    );
    let config = kube.config();
    assert!(
        !groups(&config).is_empty(),
        "the ConfigMap configures no group"
    );

    let d = kube.deployment();
    // KEDA owns the count: a `replicas` field would reset it on every `kubectl apply`.
    assert!(
        opt(d, "spec.replicas").is_none(),
        "the Deployment sets replicas, which KEDA's ScaledObject owns"
    );
    let c = kube.container();
    assert!(
        str_at(c, "image").starts_with("streamworker"),
        "the image kustomization.yaml's `images` rewrites is `streamworker`"
    );
    for key in [
        "requests.cpu",
        "requests.memory",
        "limits.cpu",
        "limits.memory",
    ] {
        assert!(
            opt(at(c, "resources"), key).is_some(),
            "the container sets no resources.{key}"
        );
    }
    let sc = at(c, "securityContext");
    assert_eq!(
        at(sc, "readOnlyRootFilesystem").as_bool(),
        Some(true),
        "readOnlyRootFilesystem (the daemon writes only to its data volume)"
    );
    assert_eq!(
        at(sc, "allowPrivilegeEscalation").as_bool(),
        Some(false),
        "allowPrivilegeEscalation"
    );
    let non_root = opt(sc, "runAsNonRoot")
        .or_else(|| opt(d, "spec.template.spec.securityContext.runAsNonRoot"))
        .and_then(Yaml::as_bool);
    assert_eq!(non_root, Some(true), "runAsNonRoot");
    // runAsNonRoot can only verify a numeric USER; and the pod's uid should be the image's.
    let user = dockerfile.last("USER").expect("the image sets a USER");
    let uid = user.split(':').next().unwrap();
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u != 0),
        "USER {user} is not a numeric non-root uid"
    );
    if let Some(run_as) = opt(d, "spec.template.spec.securityContext.runAsUser") {
        assert_eq!(
            scalar(run_as),
            uid,
            "the pod's runAsUser vs the image's USER"
        );
    }
}

#[test]
fn the_redis_password_file_is_the_mounted_secret() {
    let kube = Kube::load();
    let config = kube.config();
    let password_file =
        toml_str(&config, "redis.password_file").expect("the ConfigMap sets redis.password_file");
    let (volume, file) = kube.file_source(password_file);
    let secret = opt(volume, "secret.secretName")
        .and_then(Yaml::as_str)
        .unwrap_or_else(|| panic!("{password_file} is not mounted from a Secret: {volume:?}"));
    let key = Kube::key_for(volume, "secret", &file);
    kube.secret_value(secret, &key);
    assert!(
        !toml_str(&config, "redis.url")
            .unwrap_or_default()
            .contains('@'),
        "the password belongs in the Secret, not in redis.url"
    );
}

#[test]
fn probes_service_and_image_use_the_port_the_configuration_listens_on() {
    let kube = Kube::load();
    let port = listen_port(&kube.config());
    let c = kube.container();
    let container_ports: Vec<u16> = list_at(c, "ports")
        .iter()
        .map(|p| at(p, "containerPort").as_i64().unwrap() as u16)
        .collect();
    assert!(
        container_ports.contains(&port),
        "containerPorts {container_ports:?} lack {port}"
    );
    for (probe, path) in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz")] {
        let get = at(c, &format!("{probe}.httpGet"));
        assert_eq!(str_at(get, "path"), path, "{probe} path");
        assert_eq!(kube.resolve_port(at(get, "port")), port, "{probe} port");
    }

    let service = kube.one("Service");
    let metrics = list_at(service, "spec.ports")
        .iter()
        .find(|p| p["name"].as_str() == Some("metrics"))
        .expect("the Service has a port named metrics");
    assert_eq!(
        kube.resolve_port(at(metrics, "targetPort")),
        port,
        "Service targetPort"
    );
    assert_eq!(
        at(metrics, "port").as_i64(),
        Some(port.into()),
        "Service port"
    );

    let dockerfile = Dockerfile::load();
    let exposed: Vec<String> = dockerfile
        .last("EXPOSE")
        .expect("the image EXPOSEs a port")
        .split_whitespace()
        .map(|p| p.trim_end_matches("/tcp").to_owned())
        .collect();
    assert!(
        exposed.contains(&port.to_string()),
        "EXPOSE {exposed:?} lacks {port}"
    );
    // The HEALTHCHECK asks /livez on the configuration's own http.listen: no address or
    // endpoint of its own to keep in step.
    let health = dockerfile.healthcheck();
    assert_eq!(
        health[..2],
        ["/usr/local/bin/streamworker", "healthcheck"],
        "the HEALTHCHECK is not `streamworker healthcheck`: {health:?}"
    );
    assert!(
        !health.iter().any(|w| w == "--addr" || w == "--ready"),
        "the HEALTHCHECK should ask /livez on http.listen: {health:?}"
    );

    // The compose replicas listen on the same port their mappings and Prometheus use.
    let compose = Compose::load();
    let compose_port = listen_port(&compose_config());
    let prometheus = yaml_docs(&repo().join(COMPOSE_DIR).join("prometheus.yml")).remove(0);
    let targets: BTreeSet<String> = list_at(&prometheus, "scrape_configs")
        .iter()
        .flat_map(|job| list_at(job, "static_configs").iter())
        .flat_map(|sc| list_at(sc, "targets").iter().map(scalar))
        .collect();
    for (name, service) in compose.replicas() {
        let ports: Vec<String> = list_at(service, "ports").iter().map(scalar).collect();
        assert!(
            ports
                .iter()
                .any(|p| p.ends_with(&format!(":{compose_port}"))),
            "{name} publishes {ports:?}, not the container port {compose_port}"
        );
        assert!(
            targets.contains(&format!("{name}:{compose_port}")),
            "Prometheus does not scrape {name}:{compose_port}: {targets:?}"
        );
    }
}

#[test]
fn termination_grace_outlasts_the_shutdown_timeout() {
    // After shutdown_timeout the daemon still flushes acknowledgements and hands entries
    // back: leave it at least this long before SIGKILL.
    const MARGIN: Duration = Duration::from_secs(10);

    let kube = Kube::load();
    let timeout = duration(&kube.config(), "worker.shutdown_timeout", "30s");
    let grace = at(
        kube.deployment(),
        "spec.template.spec.terminationGracePeriodSeconds",
    )
    .as_i64()
    .expect("terminationGracePeriodSeconds is set");
    assert!(
        Duration::from_secs(grace as u64) >= timeout + MARGIN,
        "terminationGracePeriodSeconds ({grace}) must exceed worker.shutdown_timeout ({timeout:?}) by {MARGIN:?}"
    );

    let compose = Compose::load();
    let timeout = duration(&compose_config(), "worker.shutdown_timeout", "30s");
    for (name, service) in compose.replicas() {
        let text = opt(service, "stop_grace_period")
            .map(scalar)
            .unwrap_or_else(|| panic!("{name} keeps Docker's 10 s stop_grace_period"));
        let grace = humantime::parse_duration(&text).expect("stop_grace_period is a duration");
        assert!(
            grace >= timeout + MARGIN,
            "{name}: stop_grace_period ({text}) must exceed worker.shutdown_timeout ({timeout:?}) by {MARGIN:?}"
        );
    }
}

#[test]
fn selectors_and_the_disruption_budget_match_the_pods() {
    let kube = Kube::load();
    let labels = kube.pod_labels();
    let within = |what: &str, selector: &Yaml| {
        let selector = string_map(selector);
        assert!(!selector.is_empty(), "{what} selects everything");
        for (k, v) in &selector {
            assert_eq!(
                labels.get(k),
                Some(v),
                "{what} selects {k}={v}; pods have {labels:?}"
            );
        }
    };
    within(
        "the Deployment",
        at(kube.deployment(), "spec.selector.matchLabels"),
    );
    within("the Service", at(kube.one("Service"), "spec.selector"));
    let pdb = kube.one("PodDisruptionBudget");
    within(
        "the PodDisruptionBudget",
        at(pdb, "spec.selector.matchLabels"),
    );

    // The fewest replicas KEDA leaves (the Deployment sets none).
    let replicas = at(kube.one("ScaledObject"), "spec.minReplicaCount")
        .as_i64()
        .expect("minReplicaCount as a number");
    match (
        opt(pdb, "spec.maxUnavailable"),
        opt(pdb, "spec.minAvailable"),
    ) {
        (Some(max), None) => {
            let max = max.as_i64().expect("maxUnavailable as a number");
            assert!(max >= 1, "maxUnavailable {max} blocks every drain");
        }
        (None, Some(min)) => {
            let min = min.as_i64().expect("minAvailable as a number");
            assert!(
                min >= 1 && min < replicas,
                "minAvailable {min} with {replicas} replicas"
            );
        }
        other => panic!(
            "the PodDisruptionBudget needs exactly one of maxUnavailable, minAvailable: {other:?}"
        ),
    }
}

#[test]
fn the_shipped_configurations_pass_check_with_the_environment_they_get() {
    // Kubernetes: the ConfigMap's TOML with the pod's environment (downward API, Secrets).
    let kube = Kube::load();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("streamworker.toml");
    std::fs::write(&file, kube.config_text()).unwrap();
    let pod = "streamworker-7d9c6b5f4-x2x9q";
    let env = kube.pod_env(pod);
    assert_eq!(
        env.get("STREAMWORKER__WORKER__CONSUMER")
            .map(String::as_str),
        Some(pod),
        "worker.consumer must be the pod's name (downward API metadata.name)"
    );
    let resolved = check_passes("the ConfigMap's TOML", &file, &env);
    assert_overrides_applied("the Deployment", &env, &resolved);
    assert_eq!(toml_str(&resolved, "worker.consumer"), Some(pod));

    // Compose: the mounted file with each replica's environment; names never collide.
    let compose = Compose::load();
    let compose_file = repo().join(COMPOSE_DIR).join("streamworker.toml");
    let mut consumers = BTreeSet::new();
    for (name, service) in compose.replicas() {
        let env = Compose::environment(service);
        let resolved = check_passes(&format!("{name}'s configuration"), &compose_file, &env);
        assert_overrides_applied(&name, &env, &resolved);
        let consumer = toml_str(&resolved, "worker.consumer").unwrap().to_owned();
        assert!(
            consumer.contains("{hostname}") || consumers.insert(consumer.clone()),
            "two compose replicas share the consumer name {consumer:?}"
        );
    }
}

#[test]
fn keda_scales_the_deployment_on_the_lag_of_a_configured_group() {
    let kube = Kube::load();
    let config = kube.config();
    let groups = groups(&config);
    let (host, port, db) = redis_address(toml_str(&config, "redis.url").expect("redis.url"));
    let so = kube.one("ScaledObject");
    let deployment = kube.deployment();
    assert_eq!(
        str_at(so, "spec.scaleTargetRef.name"),
        str_at(deployment, "metadata.name"),
        "the ScaledObject scales another workload"
    );
    let min = at(so, "spec.minReplicaCount")
        .as_i64()
        .expect("minReplicaCount");
    let max = at(so, "spec.maxReplicaCount")
        .as_i64()
        .expect("maxReplicaCount");
    // With no `replicas` in the Deployment, KEDA alone sets the count, within these.
    assert!(
        opt(deployment, "spec.replicas").is_none(),
        "the Deployment's replicas fight KEDA's count on every apply"
    );
    assert!(1 <= min && min <= max, "min {min}, max {max}");

    let triggers = list_at(so, "spec.triggers");
    assert!(!triggers.is_empty());
    for t in triggers {
        assert_eq!(str_at(t, "type"), "redis-streams");
        let m = string_map(at(t, "metadata"));
        let group = m.get("consumerGroup").expect("consumerGroup");
        let stream = m.get("stream").expect("stream");
        assert_eq!(
            groups.get(group),
            Some(stream),
            "the trigger's consumerGroup {group:?} on {stream:?} is not a group of the ConfigMap: {groups:?}"
        );
        assert_eq!(
            m.get("address"),
            Some(&format!("{host}:{port}")),
            "address vs redis.url"
        );
        assert_eq!(
            m.get("databaseIndex").map(String::as_str).unwrap_or("0"),
            db.to_string(),
            "databaseIndex vs redis.url"
        );
        let lag: u64 = m
            .get("lagCount")
            .expect("scales on lagCount")
            .parse()
            .unwrap();
        assert!(lag > 0);
        let activation: u64 = m
            .get("activationLagCount")
            .expect("activationLagCount")
            .parse()
            .unwrap();
        assert!(activation <= lag, "activationLagCount above lagCount");

        // The password KEDA uses is the one the pods mount.
        let auth = kube.named("TriggerAuthentication", str_at(t, "authenticationRef.name"));
        let refs = list_at(auth, "spec.secretTargetRef");
        let password = refs
            .iter()
            .find(|r| r["parameter"].as_str() == Some("password"))
            .expect("the TriggerAuthentication sets the password parameter");
        let (volume, file) = kube.file_source(toml_str(&config, "redis.password_file").unwrap());
        assert_eq!(
            str_at(password, "name"),
            str_at(volume, "secret.secretName"),
            "KEDA and the pods read the password from different Secrets"
        );
        assert_eq!(
            str_at(password, "key"),
            Kube::key_for(volume, "secret", &file)
        );
    }
}

const KEDA_PARTITIONED: &str = "deploy/kubernetes/examples/keda-partitioned.yaml";

/// The configuration a file under `deploy/` shows in its comments, between
/// `# --- streamworker.toml ---` and `# --- end ---`, uncommented.
fn commented_toml(path: &str) -> String {
    let text = read(path);
    let start = text
        .find("# --- streamworker.toml ---\n")
        .unwrap_or_else(|| panic!("{path} shows no `# --- streamworker.toml ---` block"));
    let block = &text[start..];
    let end = block
        .find("# --- end ---")
        .unwrap_or_else(|| panic!("{path}: the streamworker.toml block has no `# --- end ---`"));
    block[..end]
        .lines()
        .skip(1)
        .map(|l| {
            l.strip_prefix("# ")
                .or_else(|| l.strip_prefix('#'))
                .unwrap_or_else(|| panic!("{path}: {l:?} in the TOML block is not a comment"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_partitioned_keda_example_scales_on_every_partitions_lag_up_to_the_partition_count() {
    let docs = yaml_docs(&repo().join(KEDA_PARTITIONED));
    let [so] = docs.as_slice() else {
        panic!(
            "{KEDA_PARTITIONED}: expected one document, found {}",
            docs.len()
        );
    };
    assert_eq!(str_at(so, "apiVersion"), "keda.sh/v1alpha1");
    assert_eq!(str_at(so, "kind"), "ScaledObject");
    // Not applied with the shipped manifests: KEDA refuses two ScaledObjects on one
    // Deployment, and the shipped ConfigMap has no partitioned group.
    let kustomization = read(&format!("{KUBE_DIR}/kustomization.yaml"));
    assert!(
        !kustomization.contains(KUBE_EXAMPLES),
        "kustomization.yaml applies the examples"
    );
    let kube = Kube::load();
    assert_eq!(
        str_at(so, "spec.scaleTargetRef.name"),
        str_at(kube.deployment(), "metadata.name"),
        "the example scales another workload than the shipped Deployment"
    );

    // The configuration it goes with is valid, and its group is partitioned.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("streamworker.toml");
    std::fs::write(&file, commented_toml(KEDA_PARTITIONED)).unwrap();
    let resolved = check_passes(KEDA_PARTITIONED, &file, &BTreeMap::new());
    let triggers = list_at(so, "spec.triggers");
    let [trigger] = triggers else {
        panic!("one trigger: KEDA scales on the largest of several, not their sum");
    };
    assert_eq!(str_at(trigger, "type"), "prometheus");
    let m = string_map(at(trigger, "metadata"));
    let query = m.get("query").expect("query");
    let (name, group) = groups(&resolved)
        .into_iter()
        .find(|(name, _)| query.contains(&format!("streamworker_group_lag{{group=\"{name}\"}}")))
        .unwrap_or_else(|| panic!("{query:?} sums the lag of no group of the example's TOML"));
    assert!(
        query.starts_with("sum(max by (stream, group) (streamworker_group_lag{"),
        "{query:?}: the max per partition stream (every replica exports each), summed"
    );
    let partitions = resolved["groups"][&name]
        .get("partitions")
        .and_then(toml::Value::as_integer)
        .unwrap_or_else(|| panic!("group {name} on {group} is not partitioned"));

    let min = at(so, "spec.minReplicaCount")
        .as_i64()
        .expect("minReplicaCount");
    let max = at(so, "spec.maxReplicaCount")
        .as_i64()
        .expect("maxReplicaCount");
    assert!(1 <= min && min <= max, "min {min}, max {max}");
    assert!(
        max <= partitions,
        "maxReplicaCount {max} above the {partitions} partitions: the replicas beyond them own none"
    );
    let threshold: f64 = m.get("threshold").expect("threshold").parse().unwrap();
    let activation: f64 = m
        .get("activationThreshold")
        .expect("activationThreshold")
        .parse()
        .unwrap();
    assert!(0.0 < activation && activation <= threshold);
    assert!(
        m.get("serverAddress")
            .is_some_and(|a| a.starts_with("http"))
    );
}

#[test]
fn compose_runs_redis_with_aof_three_replicas_and_a_trace_viewer() {
    let compose = Compose::load();
    let config = compose_config();
    let (redis_host, _, _) = redis_address(toml_str(&config, "redis.url").unwrap());
    let redis = compose.service(&redis_host);
    let image = str_at(redis, "image");
    assert!(
        image.starts_with("redis:7") || image.starts_with("valkey/valkey:"),
        "{redis_host} runs {image}, not Redis 7 or Valkey"
    );
    let command = Compose::command(redis);
    let flag = |name: &str| {
        command
            .iter()
            .position(|w| w == name)
            .and_then(|i| command.get(i + 1))
            .map(String::as_str)
    };
    assert_eq!(
        flag("--appendonly"),
        Some("yes"),
        "redis command {command:?}"
    );
    assert!(
        matches!(flag("--appendfsync"), Some("everysec" | "always")),
        "redis command {command:?}"
    );

    let replicas = compose.replicas();
    assert_eq!(
        replicas.len(),
        3,
        "services built from the repository's Dockerfile"
    );
    let config_path = Dockerfile::load().env("STREAMWORKER_CONFIG");
    for (name, service) in &replicas {
        let mounted = Compose::volumes(service)
            .into_iter()
            .any(|(source, target, _)| {
                target == config_path
                    && normalize(&repo().join(COMPOSE_DIR).join(&source))
                        == repo().join(COMPOSE_DIR).join("streamworker.toml")
            });
        assert!(
            mounted,
            "{name} does not mount ./streamworker.toml at {config_path}"
        );
        let depends = at(service, "depends_on");
        let on_redis = match depends {
            Yaml::Array(list) => list.iter().any(|d| scalar(d) == redis_host),
            map => opt(map, &redis_host).is_some(),
        };
        assert!(on_redis, "{name} does not depend on {redis_host}");
    }

    // Traces go to a service of the file that receives OTLP/HTTP.
    let otlp = toml_str(&config, "telemetry.otlp_endpoint").expect("telemetry.otlp_endpoint");
    let authority = otlp
        .strip_prefix("http://")
        .expect("an http:// OTLP endpoint");
    let (viewer, port) = authority
        .trim_end_matches('/')
        .split_once(':')
        .expect("host:port");
    assert_eq!(port, "4318", "OTLP/HTTP's port");
    let viewer = compose.service(viewer);
    assert!(
        str_at(viewer, "image").contains("jaeger"),
        "the trace viewer is Jaeger"
    );
    assert_eq!(
        Compose::environment(viewer)
            .get("COLLECTOR_OTLP_ENABLED")
            .map(String::as_str),
        Some("true"),
        "Jaeger all-in-one receives OTLP only with COLLECTOR_OTLP_ENABLED=true"
    );

    // Every bind mount's source exists.
    for (name, service) in compose.services() {
        for (source, _, _) in Compose::volumes(service) {
            if source.starts_with('.') || source.starts_with('/') {
                let path = normalize(&repo().join(COMPOSE_DIR).join(&source));
                assert!(
                    path.exists(),
                    "{name} mounts {source}, which does not exist"
                );
            }
        }
    }
}

#[test]
fn the_image_runs_the_binary_cargo_builds() {
    let d = Dockerfile::load();
    let binary = cargo_binary_name();

    // Runtime stage: the binary, its entry point, its configuration path, a non-root user.
    let entrypoint = Dockerfile::exec_form("ENTRYPOINT", d.last("ENTRYPOINT").expect("ENTRYPOINT"));
    let cmd = Dockerfile::exec_form("CMD", d.last("CMD").expect("CMD"));
    let program = entrypoint
        .iter()
        .find(|w| w.ends_with("/streamworker"))
        .expect("the ENTRYPOINT runs streamworker");
    assert_eq!(program, "/usr/local/bin/streamworker");
    assert_eq!(cmd, ["run"], "CMD");
    assert_eq!(
        d.env("STREAMWORKER_CONFIG"),
        "/etc/streamworker/streamworker.toml"
    );
    let (runtime_image, _) = &d.stages[d.final_stage()];
    assert!(
        !runtime_image.starts_with("rust:"),
        "the runtime image is the toolchain image"
    );

    let copy = d
        .in_stage(d.final_stage())
        .map(|(_, i)| i)
        .find(|i| i.op == "COPY" && i.args.starts_with("--from="))
        .expect("the runtime stage copies the binary from the build stage");
    let words: Vec<&str> = copy.args.split_whitespace().collect();
    let from = words[0].trim_start_matches("--from=");
    let (source, target) = (words[words.len() - 2], words[words.len() - 1]);
    assert_eq!(
        target, program,
        "the binary lands where the ENTRYPOINT looks"
    );
    let build = d
        .stages
        .iter()
        .position(|(_, name)| name.as_deref() == Some(from))
        .unwrap_or_else(|| panic!("no stage is named {from}"));
    let workdir = d
        .in_stage(build)
        .filter(|(_, i)| i.op == "WORKDIR")
        .last()
        .map(|(_, i)| i.args.trim_end_matches('/').to_owned())
        .expect("the build stage sets a WORKDIR");
    assert_eq!(
        source,
        format!("{workdir}/target/release/{binary}"),
        "cargo build --release writes target/release/{binary}"
    );

    // Build stage: manifests (every workspace member's) and lock file before the first,
    // dependency-only build; the real sources after it, then touched and built again.
    let builds: Vec<usize> = d
        .in_stage(build)
        .filter(|(_, i)| i.op == "RUN" && i.args.contains("cargo build"))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(builds.len(), 2, "a dependency build and the real build");
    for &n in &builds {
        let run = &d.instructions[n].args;
        assert!(
            run.contains("--release") && run.contains("--locked"),
            "{run}"
        );
    }
    let copies = d.context_copies();
    let copied_before = |path: &str, n: usize| copies.iter().any(|(i, s)| s == path && *i < n);
    let copied_between =
        |path: &str, a: usize, b: usize| copies.iter().any(|(i, s)| s == path && a < *i && *i < b);
    for manifest in ["Cargo.toml".to_owned(), "Cargo.lock".to_owned()]
        .into_iter()
        .chain(
            workspace_members()
                .iter()
                .map(|m| format!("{m}/Cargo.toml")),
        )
    {
        assert!(
            copied_before(&manifest, builds[0]),
            "{manifest} is not copied before the dependency build"
        );
    }
    let mut roots = vec!["src".to_owned()];
    roots.extend(workspace_members().iter().map(|m| format!("{m}/src")));
    for root in &roots {
        assert!(
            !copied_before(root, builds[0]),
            "{root} is copied before the dependency build: every edit would rebuild the dependencies"
        );
        assert!(
            copied_between(root, builds[0], builds[1]),
            "{root} is not copied before the real build"
        );
    }
    // COPY keeps the sources' old modification times: without a touch, cargo sees the
    // stub build as fresh and the image ships `fn main() {}`.
    let real_build = &d.instructions[builds[1]].args;
    for stub in ["src/main.rs", "src/lib.rs", "handlers/src/lib.rs"] {
        assert!(
            real_build.contains("touch") && real_build.contains(stub),
            "the real build does not touch {stub}: {real_build}"
        );
    }
    // The commit is declared after the dependency build (a new commit must not rebuild the
    // dependencies) and before the build that embeds it.
    let arg = d
        .in_stage(build)
        .find(|(_, i)| i.op == "ARG" && i.args.starts_with("STREAMWORKER_COMMIT"))
        .map(|(n, _)| n)
        .expect("the build stage declares ARG STREAMWORKER_COMMIT");
    assert!(
        builds[0] < arg && arg < builds[1],
        "ARG STREAMWORKER_COMMIT is declared in the wrong place"
    );

    // Nothing the sources include from outside what is copied; no build script left behind.
    assert!(!repo().join("build.rs").exists() || copies.iter().any(|(_, s)| s == "build.rs"));
    let copied_dirs: Vec<PathBuf> = roots.iter().map(|r| repo().join(r)).collect();
    let mut dirs = copied_dirs.clone();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for macro_name in ["include_str!(\"", "include_bytes!(\""] {
                for (pos, _) in text.match_indices(macro_name) {
                    let rest = &text[pos + macro_name.len()..];
                    let included = &rest[..rest.find('"').unwrap()];
                    let target = normalize(&path.parent().unwrap().join(included));
                    assert!(
                        copied_dirs.iter().any(|d| target.starts_with(d)),
                        "{} includes {included}, which the Dockerfile does not copy",
                        path.display()
                    );
                }
            }
        }
    }
}

#[test]
fn dockerignore_leaves_out_build_output_but_nothing_the_build_copies() {
    let patterns = dockerignore();
    for out in ["target", "target/release/streamworker", ".git", ".git/HEAD"] {
        assert!(
            dockerignored(&patterns, out),
            ".dockerignore lets {out} into the context"
        );
    }
    for (_, source) in Dockerfile::load().context_copies() {
        assert!(
            !dockerignored(&patterns, &source),
            "the Dockerfile copies {source}, which .dockerignore leaves out"
        );
        assert!(
            repo().join(&source).exists(),
            "the Dockerfile copies {source}, which does not exist"
        );
    }
    // Files inside copied directories count too (e.g. the Lua scripts next to the client).
    for file in ["src/main.rs", "src/client/mod.rs", "handlers/src/lib.rs"] {
        assert!(
            !dockerignored(&patterns, file),
            ".dockerignore leaves out {file}"
        );
    }
    // The matcher itself: a pattern must be able to exclude something, and `!` re-includes.
    assert!(dockerignored(&["**/*.rs".into()], "src/main.rs"));
    assert!(!dockerignored(
        &["src/".into(), "!src/main.rs".into()],
        "src/main.rs"
    ));
}

#[test]
fn the_healthcheck_exits_0_only_while_livez_answers_200_and_1_otherwise() {
    let command = Dockerfile::load().healthcheck();
    let compose_file = repo().join(COMPOSE_DIR).join("streamworker.toml");
    let http_port = free_port();
    // The image's environment (STREAMWORKER_CONFIG) plus what points the compose
    // configuration at this test's ports; the HEALTHCHECK and the daemon share it, as they
    // share a container.
    let mut env = daemon_env(
        &compose_file,
        &format!("redis://127.0.0.1:{}/0", free_port()),
        http_port,
    );
    env.insert(
        "STREAMWORKER__REDIS__CONNECT_TIMEOUT".into(),
        "200ms".into(),
    );
    let ready: Vec<String> = command.iter().cloned().chain(["--ready".into()]).collect();

    // Nothing listening: unhealthy, exit 1 (Docker reserves 2), saying why.
    let (code, stderr) = run_healthcheck(&command, &env);
    assert_eq!(
        code,
        Some(1),
        "the HEALTHCHECK with nothing listening: {stderr}"
    );
    assert!(stderr.contains("cannot connect"), "{stderr}");
    // A configuration it cannot read: 1 as well, naming the file.
    let mut broken = env.clone();
    broken.insert(
        "STREAMWORKER_CONFIG".into(),
        "/nonexistent/streamworker.toml".into(),
    );
    let (code, stderr) = run_healthcheck(&command, &broken);
    assert_eq!(
        code,
        Some(1),
        "the HEALTHCHECK without its configuration: {stderr}"
    );
    assert!(
        stderr.contains("/nonexistent/streamworker.toml"),
        "{stderr}"
    );
    // A listener that accepts but never answers (a hung daemon): unhealthy once --timeout
    // has passed, not when Docker's own timeout kills the check.
    let hung = TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_addr = hung.local_addr().unwrap().to_string();
    let started = Instant::now();
    let hung_check: Vec<String> = command
        .iter()
        .cloned()
        .chain([
            "--addr".into(),
            hung_addr,
            "--timeout".into(),
            "300ms".into(),
        ])
        .collect();
    let (code, stderr) = run_healthcheck(&hung_check, &env);
    assert_eq!(
        code,
        Some(1),
        "the HEALTHCHECK against a hung listener: {stderr}"
    );
    assert!(stderr.contains("no answer within"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "--timeout 300ms took {:?}",
        started.elapsed()
    );
    drop(hung);

    // The daemon, pointed at a Redis that is not there: it waits for Redis, alive
    // (/livez 200) but not ready (/readyz 503).
    let dir = tempfile::tempdir().unwrap();
    let mut run = Command::new(env!("CARGO_BIN_EXE_streamworker"));
    run.arg("run").env_clear().envs(&env);
    let mut daemon = Daemon::spawn(run, &dir.path().join("daemon.log"));

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, stderr) = run_healthcheck(&command, &env);
        if code == Some(0) {
            break;
        }
        assert_eq!(code, Some(1), "{stderr}");
        if let Some(status) = daemon.exited() {
            panic!(
                "streamworker exited ({status}) before /livez answered:\n{}",
                daemon.logs()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the HEALTHCHECK never passed ({stderr}):\n{}",
            daemon.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, stderr) = run_healthcheck(&ready, &env);
    assert_eq!(
        code,
        Some(1),
        "`healthcheck --ready` passes while Redis is down: it does not read the status"
    );
    assert!(stderr.contains("503"), "{stderr}");
    // --addr asks that address and needs no configuration.
    let by_addr: Vec<String> = command
        .iter()
        .cloned()
        .chain(["--addr".into(), format!("127.0.0.1:{http_port}")])
        .collect();
    let (code, stderr) = run_healthcheck(&by_addr, &broken);
    assert_eq!(
        code,
        Some(0),
        "`healthcheck --addr` on a live daemon: {stderr}"
    );

    // SIGTERM, as `docker stop` sends it to the ENTRYPOINT: a clean exit; then unhealthy.
    let status = daemon.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "exit after SIGTERM:\n{}",
        daemon.logs()
    );
    assert_eq!(run_healthcheck(&command, &env).0, Some(1));
}

#[test]
fn base_images_are_pinned_and_the_runtime_stage_needs_no_shell() {
    let d = Dockerfile::load();
    for image in d.base_images() {
        let name = image.split('@').next().unwrap();
        let tag = name
            .rsplit_once(':')
            .map(|(_, t)| t)
            .filter(|t| !t.contains('/'));
        let digest = image.split_once("@sha256:").map(|(_, h)| h);
        let versioned = tag.is_some_and(|t| t != "latest" && t.chars().any(|c| c.is_ascii_digit()));
        assert!(
            versioned
                || digest
                    .is_some_and(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit())),
            "FROM {image} is not pinned to a version (a tag with a version, or a sha256 digest)"
        );
    }
    // No shell in the final image: nothing may RUN there, and every command it runs is the
    // binary in exec form (a shell form would need /bin/sh).
    let runtime = d.final_stage();
    assert!(
        !d.in_stage(runtime).any(|(_, i)| i.op == "RUN"),
        "the runtime stage RUNs a command: it needs a shell"
    );
    let entrypoint = Dockerfile::exec_form("ENTRYPOINT", d.last("ENTRYPOINT").expect("ENTRYPOINT"));
    for (what, command) in [("ENTRYPOINT", entrypoint), ("HEALTHCHECK", d.healthcheck())] {
        assert_eq!(
            command[0], "/usr/local/bin/streamworker",
            "the {what} runs something other than the binary: {command:?}"
        );
    }
    // And the subcommand the HEALTHCHECK names exists in this binary.
    let health = d.healthcheck();
    let out = Command::new(env!("CARGO_BIN_EXE_streamworker"))
        .args(&health[1..])
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "`streamworker {} --help` fails: {}",
        health[1..].join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_compose_prometheus_configuration_passes_promtool() {
    // promtool ships with Debian's `prometheus` package (scripts/test installs it). Without
    // it this test fails: skipping would pass with the configuration unchecked.
    require_promtool("promtool check config");
    // The rule files are paths inside the Prometheus container: map them back through the
    // service's mounts, so promtool also checks that the mounted rules are the right file.
    let compose = Compose::load();
    let prometheus = compose
        .services()
        .into_iter()
        .find(|(_, s)| str_at(s, "image").contains("prometheus"))
        .map(|(_, s)| s)
        .expect("a Prometheus service");
    let mut text = read("deploy/compose/prometheus.yml");
    let mut mapped = 0;
    for (source, target, _) in Compose::volumes(prometheus) {
        if target.ends_with(".yml") && text.contains(&format!("- {target}")) {
            let host = normalize(&repo().join(COMPOSE_DIR).join(&source));
            text = text.replace(&format!("- {target}"), &format!("- {}", host.display()));
            mapped += 1;
        }
    }
    assert!(
        mapped > 0,
        "no rule file of prometheus.yml is mounted into the container"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prometheus.yml");
    std::fs::write(&file, text).unwrap();
    promtool(&["check", "config", file.to_str().unwrap()]);
}

#[test]
fn the_runtime_base_ships_every_library_the_binary_needs() {
    // What each base the runtime stage may use provides to a dynamically linked binary.
    // distroless/cc: glibc, libgcc and libstdc++/libgomp (and CA certificates); static and
    // scratch: nothing, so a glibc binary would not start there.
    let glibc = [
        "libc.so.6",
        "libm.so.6",
        "libpthread.so.0",
        "libdl.so.2",
        "librt.so.1",
        "libutil.so.1",
        "ld-linux-x86-64.so.2",
        "ld-linux-aarch64.so.1",
    ];
    let d = Dockerfile::load();
    let runtime = d.base_images().pop().expect("a runtime base");
    let provided: Vec<&str> = if runtime.starts_with("gcr.io/distroless/cc-") {
        glibc
            .iter()
            .copied()
            .chain(["libgcc_s.so.1", "libstdc++.so.6", "libgomp.so.1"])
            .collect()
    } else if runtime.starts_with("gcr.io/distroless/static") || runtime == "scratch" {
        Vec::new()
    } else {
        panic!("the runtime base {runtime} is not one this test knows the libraries of")
    };
    let out = Command::new("readelf")
        .args(["--dynamic", "--wide"])
        .arg(env!("CARGO_BIN_EXE_streamworker"))
        .output()
        .expect("run readelf (binutils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dynamic = String::from_utf8_lossy(&out.stdout);
    let needed: Vec<&str> = dynamic
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split_once('[').and_then(|(_, r)| r.split_once(']')))
        .map(|(lib, _)| lib)
        .collect();
    assert!(
        needed.contains(&"libc.so.6"),
        "readelf shows no libc among {needed:?}: is the parsing wrong?"
    );
    for lib in &needed {
        assert!(
            provided.contains(lib),
            "the binary needs {lib}, which the runtime base {runtime} does not ship"
        );
    }
}

// ---- the image's file layout ---------------------------------------------------------------

/// The relative paths a resolved configuration writes to (warehouse `directory`, learning
/// `dataset_dir`), by group.
fn relative_write_paths(resolved: &toml::Table) -> Vec<(String, PathBuf)> {
    let mut paths = Vec::new();
    let Some(groups) = resolved.get("groups").and_then(toml::Value::as_table) else {
        return paths;
    };
    for (name, group) in groups {
        let Some(options) = group.get("options").and_then(toml::Value::as_table) else {
            continue;
        };
        for key in ["directory", "dataset_dir"] {
            if let Some(path) = options.get(key).and_then(toml::Value::as_str)
                && !path.is_empty()
                && Path::new(path).is_relative()
            {
                paths.push((name.clone(), PathBuf::from(path)));
            }
        }
    }
    paths
}

#[test]
fn every_shipped_configuration_runs_in_the_images_layout_as_its_user() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;

    // What the image promises: a numeric non-root USER whose WORKDIR is a VOLUME the image
    // creates owned by that user.
    let d = Dockerfile::load();
    let (uid, gid) = d.user();
    assert_ne!(uid, 0, "the image runs as root");
    let workdir = d.workdir();
    assert!(
        d.volumes().contains(&workdir),
        "the WORKDIR {workdir} is not a VOLUME {:?}: files the groups write would land in the container's root filesystem",
        d.volumes()
    );
    let chown = format!("--chown={uid}:{gid}");
    assert!(
        d.in_stage(d.final_stage()).any(|(_, i)| {
            i.op == "COPY"
                && i.args.split_whitespace().any(|w| w == chown)
                && i.args
                    .split_whitespace()
                    .last()
                    .map(|t| t.trim_end_matches('/'))
                    == Some(workdir.as_str())
        }),
        "no `COPY {chown} … {workdir}` creates the data directory owned by the image's user"
    );
    // The pod mounts a writable volume there: the rest of its root is read-only.
    let kube = Kube::load();
    let mount = list_at(kube.container(), "volumeMounts")
        .iter()
        .find(|m| str_at(m, "mountPath").trim_end_matches('/') == workdir)
        .unwrap_or_else(|| {
            panic!("the Deployment mounts nothing at the image's WORKDIR {workdir}")
        });
    assert_ne!(
        opt(mount, "readOnly").and_then(Yaml::as_bool),
        Some(true),
        "the data volume is mounted read-only"
    );
    let volume = list_at(kube.deployment(), "spec.template.spec.volumes")
        .iter()
        .find(|v| str_at(v, "name") == str_at(mount, "name"))
        .expect("the data mount's volume");
    assert!(
        opt(volume, "emptyDir").is_some() || opt(volume, "persistentVolumeClaim").is_some(),
        "the data volume is neither an emptyDir nor a PVC: {}",
        describe(volume)
    );

    // The final stage's layout in a temporary root: the binary where the ENTRYPOINT runs
    // it, the configuration where STREAMWORKER_CONFIG points, the data directory owned by
    // the image's user; everything else owned by root and not writable by that user.
    // Running as another user needs root; otherwise the test runs as the current user
    // (which then owns everything, so the negative control below is left out).
    let as_root = unsafe { libc::geteuid() } == 0;
    let (uid, gid) = if as_root {
        (uid, gid)
    } else {
        eprintln!("not root: running the configurations as the current user");
        (unsafe { libc::geteuid() }, unsafe { libc::getegid() })
    };
    let root_dir = tempfile::tempdir().unwrap();
    let root = root_dir.path();
    let reroot = |path: &str| root.join(path.trim_start_matches('/'));
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let binary = reroot("/usr/local/bin/streamworker");
    let config_file = reroot(&d.env("STREAMWORKER_CONFIG"));
    let data = reroot(&workdir);
    for dir in [
        binary.parent().unwrap(),
        config_file.parent().unwrap(),
        &data,
    ] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let mut walk = data.clone();
    while walk != root {
        std::fs::set_permissions(&walk, std::fs::Permissions::from_mode(0o755)).unwrap();
        walk = walk.parent().unwrap().to_owned();
    }
    std::fs::copy(env!("CARGO_BIN_EXE_streamworker"), &binary).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&data, Some(uid), Some(gid)).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o750)).unwrap();

    let scratch = tempfile::tempdir().unwrap();
    let redis = Redis::start(scratch.path());
    let pod = "streamworker-7d9c6b5f4-x2x9q";
    let pod_env = kube.pod_env(pod);

    let as_user = |command: &mut Command, cwd: &Path, env: &BTreeMap<String, String>| {
        command.current_dir(cwd).env_clear().envs(env);
        if as_root {
            command.uid(uid).gid(gid);
        }
    };

    let mut configs: Vec<PathBuf> = std::fs::read_dir(repo().join("config"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("toml"))
        .collect();
    configs.sort();
    assert!(!configs.is_empty(), "config/ holds no configuration");
    let mut wrote_files = 0;
    let mut writers = Vec::new();
    for (n, source) in configs.iter().enumerate() {
        let what = source.file_name().unwrap().to_string_lossy().into_owned();
        std::fs::copy(source, &config_file).unwrap();
        std::fs::set_permissions(&config_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = std::fs::read_to_string(source).unwrap();
        let configured = groups(&parse_toml(&what, &text));
        // The environment the Deployment gives its pods (overrides of groups this file does
        // not have left out), the image's STREAMWORKER_CONFIG, and this test's ports.
        let mut env: BTreeMap<String, String> = pod_env
            .iter()
            .filter(|(k, _)| match k.strip_prefix("STREAMWORKER__GROUPS__") {
                Some(rest) => configured
                    .keys()
                    .any(|g| rest.starts_with(&format!("{}__", g.to_uppercase()))),
                None => true,
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.extend(daemon_env(
            &config_file,
            &redis.url(n as u32 % 16),
            free_port(),
        ));

        // `check`, as the image's user in the data directory.
        let mut check = Command::new(&binary);
        check.arg("check");
        as_user(&mut check, &data, &env);
        let out = check.output().unwrap();
        assert!(
            out.status.success(),
            "{what}: `streamworker check` fails in the image's layout:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let resolved = parse_toml(&what, &String::from_utf8_lossy(&out.stdout));
        let writes = relative_write_paths(&resolved);

        // `run`, until every group runs (`healthcheck --ready`), then SIGTERM.
        let mut run = Command::new(&binary);
        run.arg("run");
        as_user(&mut run, &data, &env);
        let mut daemon = Daemon::spawn(run, &scratch.path().join(format!("{what}.log")));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut health = Command::new(&binary);
            health.args(["healthcheck", "--ready"]);
            as_user(&mut health, &data, &env);
            let out = health.output().unwrap();
            if out.status.success() {
                break;
            }
            if let Some(status) = daemon.exited() {
                panic!(
                    "{what}: streamworker exited ({status}) in the image's layout:\n{}",
                    daemon.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{what}: never ready in the image's layout ({}):\n{}",
                String::from_utf8_lossy(&out.stderr),
                daemon.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        for (group, path) in &writes {
            let dir = data.join(path);
            let meta = std::fs::metadata(&dir).unwrap_or_else(|e| {
                panic!(
                    "{what}: group {group} runs but {} is not in the data directory: {e}",
                    dir.display()
                )
            });
            assert!(
                meta.is_dir() && meta.uid() == uid,
                "{what}: {} is not a directory of uid {uid}",
                dir.display()
            );
            eprintln!(
                "{what}: group {group} made {} (uid {})",
                dir.display(),
                meta.uid()
            );
            wrote_files += 1;
        }
        let status = daemon.terminate();
        assert_eq!(
            status.code(),
            Some(0),
            "{what}: exit after SIGTERM:\n{}",
            daemon.logs()
        );
        if !writes.is_empty() {
            writers.push((source.clone(), writes));
        }
    }
    assert!(
        wrote_files >= 3,
        "the shipped configurations should include the warehouse, audit and learning directories; found {wrote_files}"
    );

    // The control: in a working directory the user cannot write (the old image had none,
    // so `/`), every configuration that writes files refuses to start, naming its path.
    if as_root {
        for (source, writes) in &writers {
            let what = source.file_name().unwrap().to_string_lossy().into_owned();
            std::fs::copy(source, &config_file).unwrap();
            let env = daemon_env(&config_file, &redis.url(15), free_port());
            let mut run = Command::new(&binary);
            run.arg("run");
            as_user(&mut run, root, &env);
            let mut child = Daemon::spawn(run, &scratch.path().join(format!("{what}.control.log")));
            let status = child.wait_exit(
                Duration::from_secs(30),
                &format!("{what} in a working directory its user cannot write"),
            );
            let logs = child.logs();
            assert!(!status.success(), "{what}: {status}\n{logs}");
            assert!(
                writes
                    .iter()
                    .any(|(_, path)| logs.contains(&*path.to_string_lossy())),
                "{what} refused to start without naming {writes:?}:\n{logs}"
            );
        }
    }
}

// ---- docs/configuration.md's defaults ------------------------------------------------------

/// The value at a dotted path of a TOML table (`groups.g1.block`).
fn toml_at<'a>(t: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Value> {
    let (last, parents) = path.split_last()?;
    let mut table = t;
    for key in parents {
        table = table.get(*key)?.as_table()?;
    }
    table.get(*last)
}

/// A scalar as the docs write it: strings bare, numbers and booleans as TOML prints them.
fn as_written(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// docs/configuration.md's tables of `[redis]`, `[worker]`, `[http]`/`[telemetry]`, `[groups.<name>]` and
/// `[streams.<name>]` give, for each key, the default `check` resolves for a configuration
/// that sets nothing but a group's stream and handler; and every key `check` prints there
/// has a row.
#[test]
fn the_configuration_defaults_tables_are_what_check_prints() {
    let (stream, group) = ("orders", "g1");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("minimal.toml");
    std::fs::write(
        &file,
        format!("[groups.{group}]\nstream = \"{stream}\"\nhandler = \"noop\"\n"),
    )
    .unwrap();
    let resolved = check_passes("a minimal configuration", &file, &BTreeMap::new());

    let readme = read("docs/configuration.md");
    // (table header, [(key, default)]) for every table whose second column is "default".
    let mut tables: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let mut in_table = false;
    for line in readme.lines() {
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split(" | ")
            .map(str::trim)
            .collect();
        if !line.starts_with('|') {
            in_table = false;
        } else if cells.len() >= 2 && cells[1] == "default" && cells[0].starts_with("`[") {
            tables.push((cells[0].to_owned(), Vec::new()));
            in_table = true;
        } else if in_table && !cells[0].starts_with("---") {
            let key = cells[0].trim_matches('`').to_owned();
            tables
                .last_mut()
                .unwrap()
                .1
                .push((key, cells[1].to_owned()));
        }
    }
    let mut sections: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (header, rows) in &tables {
        let prefix = match header.as_str() {
            "`[redis]`" => "redis",
            "`[worker]`" => "worker",
            "`[http]` / `[telemetry]`" => "",
            "`[groups.<name>]`" => "groups.g1",
            "`[streams.<name>]`" => "streams.orders",
            other => panic!(
                "docs/configuration.md has a defaults table this test does not know: {other}"
            ),
        };
        for (key, default) in rows {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            let segments: Vec<&str> = path.split('.').collect();
            sections
                .entry(if prefix.is_empty() {
                    segments[0].to_owned()
                } else {
                    prefix.to_owned()
                })
                .or_default()
                .push(segments.last().unwrap().to_string());
            let got = toml_at(&resolved, &segments);
            let default = default.trim_matches('`');
            match default {
                "required" => assert!(got.is_some(), "{path} is required yet not printed"),
                "—" => assert!(
                    got.is_none(),
                    "docs/configuration.md: {path} has no default; check prints {got:?}"
                ),
                "{}" => assert!(
                    got.is_none_or(|v| v.as_table().is_some_and(|t| t.is_empty())),
                    "docs/configuration.md: {path} defaults to {{}}; check prints {got:?}"
                ),
                inline if inline.starts_with("{ ") => {
                    let expected = parse_toml(
                        &format!("docs/configuration.md's default of {path}"),
                        &format!("v = {inline}"),
                    )["v"]
                        .clone();
                    assert_eq!(
                        got,
                        Some(&expected),
                        "docs/configuration.md's default of {path}"
                    );
                }
                scalar => {
                    let expected = scalar
                        .trim_matches('"')
                        .replace("<stream>", stream)
                        .replace("<group>", group);
                    assert_eq!(
                        got.map(as_written),
                        Some(expected),
                        "docs/configuration.md's default of {path}"
                    );
                }
            }
        }
    }
    // The other way round: every key check resolves in these tables has a row.
    for (section, documented) in &sections {
        let segments: Vec<&str> = section.split('.').collect();
        let Some(printed) = toml_at(&resolved, &segments).and_then(|v| v.as_table()) else {
            continue;
        };
        for key in printed.keys() {
            // A handler's options have tables of their own, per handler.
            if section == "groups.g1" && key == "options" {
                continue;
            }
            assert!(
                documented.contains(key),
                "check prints {section}.{key}, which docs/configuration.md's defaults table does not list"
            );
        }
    }
    assert!(
        sections.len() >= 5,
        "docs/configuration.md's defaults tables were not found: {sections:?}"
    );
}

/// README's "A first configuration": the TOML block is valid as written, and `check` prints
/// the two values README says it derives (the webhook's `timeout` from `handler_timeout`,
/// the backoff's `max` from `claim_idle`) marked as derived.
#[test]
fn the_readme_first_configuration_passes_check_and_marks_what_it_derived() {
    let readme = read("README.md");
    let section = &readme[readme
        .find("## A first configuration")
        .expect("README has \"## A first configuration\"")..];
    let start = section.find("```toml\n").expect("a TOML block") + "```toml\n".len();
    let example = &section[start..start + section[start..].find("```").unwrap()];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("streamworker.toml");
    std::fs::write(&file, example).unwrap();
    let out = check(&file, &BTreeMap::new());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "README's first configuration is refused:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resolved = parse_toml("the configuration `check` prints", &stdout);
    let group = |key: &str| toml_at(&resolved, &["groups", "orders", key]).map(as_written);
    assert_eq!(group("stream").as_deref(), Some("orders"));
    assert_eq!(group("handler").as_deref(), Some("webhook"));
    assert_eq!(
        toml_at(&resolved, &["groups", "orders", "options", "timeout"]).map(as_written),
        Some("1s".to_owned()),
        "the webhook's timeout is derived from handler_timeout:\n{stdout}"
    );
    for line in ["timeout = ", "max = "] {
        assert!(
            stdout
                .lines()
                .any(|l| l.trim_start().starts_with(line) && l.contains("# derived from")),
            "`check` marks {line:?} as derived:\n{stdout}"
        );
    }
    assert!(
        !stdout
            .lines()
            .any(|l| l.trim_start().starts_with("claim_idle") && l.contains("derived")),
        "a value README sets is not derived:\n{stdout}"
    );
}
