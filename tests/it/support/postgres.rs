//! A throwaway PostgreSQL cluster for the warehouse tests: `initdb` in a temporary
//! directory, `pg_ctl` on a free port, stopped when dropped. initdb and postgres refuse to
//! run as root, so under root they run as the `postgres` user the package creates.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::free_port;

/// Where PostgreSQL's programs are: on PATH, or the newest `/usr/lib/postgresql/*/bin`.
pub fn postgres_bin() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file());
    if let Some(dir) = on_path {
        return dir;
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).expect(
        "PostgreSQL is not installed (no initdb on PATH or under /usr/lib/postgresql/*/bin); scripts/test installs it, or set DATABASE_URL",
    )
}

/// A private cluster, listening on 127.0.0.1 and on a Unix socket in its directory.
pub struct PgCluster {
    pub bin: PathBuf,
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// Who runs initdb and postgres: `postgres` when the tests run as root.
    user: Option<String>,
    /// Server settings for every start (`-c name=value …`).
    settings: String,
}

impl PgCluster {
    /// Starts a cluster. `prepare` gets its directory before initdb runs (to write
    /// certificates or a password file there) and returns initdb's authentication
    /// arguments and the server settings of every start.
    pub fn start(prepare: impl FnOnce(&Path) -> (Vec<String>, String)) -> Self {
        let bin = postgres_bin();
        let user = (unsafe { libc::geteuid() } == 0).then(|| "postgres".to_owned());
        let dir = tempfile::tempdir().expect("temp dir");
        let (auth, settings) = prepare(dir.path());
        if let Some(user) = &user {
            let status = Command::new("chown")
                .arg("-R")
                .arg(format!("{user}:"))
                .arg(dir.path())
                .status()
                .expect("chown runs");
            assert!(
                status.success(),
                "cannot hand {} to user {user} (running as root, initdb needs another user; the postgresql package creates `postgres`)",
                dir.path().display()
            );
        }
        let mut cluster = Self {
            bin,
            dir,
            port: 0,
            user,
            settings,
        };
        let out = cluster
            .command("initdb")
            .arg("-D")
            .arg(cluster.data())
            .args(["-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"])
            .args(&auth)
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for _ in 0..10 {
            cluster.port = free_port();
            if cluster.pg_ctl("start") {
                return cluster;
            }
        }
        panic!(
            "PostgreSQL did not start: {}",
            std::fs::read_to_string(cluster.dir.path().join("log")).unwrap_or_default()
        );
    }

    /// One of PostgreSQL's programs, run as the cluster's user.
    pub fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match &self.user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `pg_ctl start` (with the cluster's settings) or, for any other action, an
    /// immediate stop; whether it worked.
    pub fn pg_ctl(&self, action: &str) -> bool {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 {}",
            self.port,
            self.dir.path().display(),
            self.settings
        );
        let mut c = self.command("pg_ctl");
        c.arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("log"));
        match action {
            "start" => c.args(["-w", "-t", "20", "-o", &options, "start"]),
            _ => c.args(["-w", "-m", "immediate", "stop"]),
        };
        c.stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Runs SQL with psql against `conninfo`; the output unaligned, tuples only.
    pub fn psql(bin: Option<&Path>, conninfo: &str, sql: &str) -> Result<String, String> {
        let psql = bin
            .map(|b| b.join("psql"))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("psql"));
        let out = Command::new(psql)
            .arg(conninfo)
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.pg_ctl("stop");
    }
}
