//! The command line as people use it day to day: completions, the manual page, `--json`
//! on commands that print a result, `status --watch`, and the demo's live line.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::support::*;

/// The subcommands `--help` lists (of the top level, or of `parent`), without `help`:
/// read from the binary, so a command added later is covered too.
fn subcommands(parent: &[&str]) -> Vec<String> {
    let mut args = parent.to_vec();
    args.push("--help");
    let (code, out, err) = run_cli(&args, &[]);
    assert_eq!(code, 0, "{err}");
    let names: Vec<String> = out
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(str::to_owned)
        .collect();
    assert!(names.len() >= 2, "no commands listed in:\n{out}");
    names
}

#[test]
fn completions_for_bash_zsh_and_fish_know_every_subcommand() {
    let top = subcommands(&[]);
    let dlq = subcommands(&["dlq"]);
    for shell in ["bash", "zsh", "fish"] {
        let (code, script, err) = run_cli(&["completions", shell], &[]);
        assert_eq!(code, 0, "{shell}: {err}");
        assert!(script.len() > 1000, "{shell}: a real script:\n{script}");
        for name in top.iter().chain(&dlq) {
            assert!(
                script.contains(name.as_str()),
                "{shell} completion does not mention {name}"
            );
        }
        // Flags too (fish writes `-l watch` for `--watch`).
        let flag = |name: &str| {
            if shell == "fish" {
                format!("-l {name}")
            } else {
                format!("--{name}")
            }
        };
        assert!(
            script.contains(&flag("group")) && script.contains(&flag("watch")),
            "{shell} completes flags"
        );
    }
    // bash loads it and registers the completion for the command.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("streamworker.bash");
    std::fs::write(&file, run_cli(&["completions", "bash"], &[]).1).unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p streamworker",
            file.display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("streamworker"),
        "{out:?}"
    );
    let (code, _, err) = run_cli(&["completions", "tcsh"], &[]);
    assert_eq!(code, 2, "an unknown shell is bad usage: {err}");
    assert!(err.contains("bash") && err.contains("zsh"), "{err}");
}

#[test]
fn the_man_page_is_roff_with_a_section_and_examples_per_subcommand() {
    let (code, page, err) = run_cli(&["man"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        page.lines().any(|l| l.starts_with(".TH streamworker 1")),
        "a title line:\n{page}"
    );
    for section in [".SH NAME", ".SH SYNOPSIS", ".SH OPTIONS"] {
        assert!(page.contains(section), "{section} missing");
    }
    let mut commands: Vec<String> = subcommands(&[])
        .into_iter()
        .map(|c| format!("streamworker {c}"))
        .collect();
    commands.extend(
        subcommands(&["dlq"])
            .into_iter()
            .map(|c| format!("streamworker dlq {c}")),
    );
    for command in &commands {
        let heading = format!(".SH \"{}\"", command.to_uppercase());
        let start = page
            .find(&heading)
            .unwrap_or_else(|| panic!("no section {heading}"));
        let section = &page[start + heading.len()..];
        let section = &section[..section.find("\n.SH ").unwrap_or(section.len())];
        assert!(section.contains(".SS OPTIONS"), "{command}:\n{section}");
        assert!(
            section.contains(".SS EXAMPLES"),
            "{command} has no examples:\n{section}"
        );
    }
    // Every flag is explained: each `.TP` item (the flag) is followed by its help text.
    let lines: Vec<&str> = page.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if *line == ".TP" {
            let help = lines.get(i + 2).copied().unwrap_or("");
            assert!(
                !help.is_empty() && !help.starts_with('.'),
                "{} has no help text",
                lines.get(i + 1).copied().unwrap_or("")
            );
        }
    }
    assert_eq!(
        page.matches("\n.nf\n").count(),
        page.matches("\n.fi\n").count(),
        "every no-fill block is closed"
    );
    // groff formats it without a warning (every request and escape is valid).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("streamworker.1");
    std::fs::write(&file, &page).unwrap();
    match Command::new("groff")
        .args(["-man", "-ww", "-z"])
        .arg(&file)
        .output()
    {
        Ok(out) => {
            assert!(out.status.success(), "{out:?}");
            assert!(
                out.stderr.is_empty(),
                "groff: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("groff is not installed: the page's structure was checked, not its rendering")
        }
        Err(e) => panic!("groff: {e}"),
    }
}

#[test]
fn check_and_produce_print_json_with_json() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &config(
            &redis.url().replace("redis://", "redis://:hunter2@"),
            "r1",
            "[groups.billing]\nstream = \"orders\"\nhandler = \"noop\"\n",
        ),
    );
    let (code, out, err) = run_cli(&["check", "-c", &path, "--json"], &[]);
    assert_eq!(code, 0, "{err}");
    let resolved: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(resolved["groups"]["billing"]["stream"], "orders");
    assert_eq!(
        resolved["groups"]["billing"]["dead_letter_stream"],
        "{orders}:dlq:billing"
    );
    assert_eq!(resolved["worker"]["consumer"], "r1");
    assert!(!out.contains("hunter2"), "secrets stay redacted:\n{out}");
    assert!(err.contains("is valid"), "{err}");

    let (code, out, err) = run_cli(
        &[
            "produce",
            "--scenario",
            "commerce",
            "--url",
            &redis.url(),
            "--count",
            "50",
            "--json",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let summary: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(summary["stream"], "events.raw");
    assert_eq!(summary["added"], 50);
    let mut con = redis.connection();
    let length: u64 = redis::cmd("XLEN")
        .arg("events.raw")
        .query(&mut con)
        .unwrap();
    assert_eq!(length, 50, "the summary tells the truth");
}

/// Lines of a child's stdout as they arrive, with when they arrived.
fn lines_of(child: &mut std::process::Child) -> mpsc::Receiver<(Instant, String)> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send((Instant::now(), line)).is_err() {
                return;
            }
        }
    });
    rx
}

fn wait_for_exit(child: &mut std::process::Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    None
}

/// `status --watch --json` every `interval` on a noop `billing` group of `orders`, with
/// its output piped; the config lives in `dir`.
fn watch_status(dir: &tempfile::TempDir, url: &str, interval: &str) -> std::process::Child {
    let path = write_config(
        dir,
        &config(
            url,
            "r1",
            "[groups.billing]\nstream = \"orders\"\nhandler = \"noop\"\n",
        ),
    );
    Command::new(binary())
        .args([
            "status",
            "-c",
            &path,
            "--watch",
            "--interval",
            interval,
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn status_watch_json_prints_a_document_per_interval_until_ctrl_c() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    create_group(&mut con, "orders", "billing", "0");
    produce(
        &mut con,
        "orders",
        &(0..3)
            .map(|i| vec![("n", i.to_string())])
            .collect::<Vec<_>>(),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut child = watch_status(&dir, &redis.url(), "1s");
    let lines = lines_of(&mut child);
    let document = |timeout: Duration| -> (Instant, serde_json::Value) {
        let (at, line) = lines
            .recv_timeout(timeout)
            .expect("a status document within the timeout");
        let value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("one JSON document per line: {e}: {line}"));
        (at, value)
    };
    let (first_at, first) = document(Duration::from_secs(20));
    assert_eq!(first[0]["stream"], "orders", "{first}");
    assert_eq!(first[0]["length"], 3, "{first}");
    assert_eq!(first[0]["groups"][0]["lag"], 3, "{first}");
    // The next refresh sees what changed meanwhile.
    produce(
        &mut con,
        "orders",
        &(0..2)
            .map(|i| vec![("n", i.to_string())])
            .collect::<Vec<_>>(),
    );
    let (second_at, second) = document(Duration::from_secs(10));
    let (third_at, third) = document(Duration::from_secs(10));
    let gap = second_at - first_at;
    assert!(
        gap >= Duration::from_millis(700) && gap <= Duration::from_secs(5),
        "about one document per --interval 1s, got {gap:?}"
    );
    assert!(
        third_at - second_at >= Duration::from_millis(700),
        "{:?}",
        third_at - second_at
    );
    assert_eq!(third[0]["length"], 5, "refreshed:\n{second}\n{third}");

    // Ctrl-C ends the watch cleanly.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let code = wait_for_exit(&mut child, Duration::from_secs(10));
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(code, Some(0), "exit after SIGINT; stderr: {err}");
    // Nothing but documents on stdout, up to the end.
    while let Ok((_, line)) = lines.recv_timeout(Duration::from_millis(500)) {
        serde_json::from_str::<serde_json::Value>(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
}

/// People watch while something is wrong: a Redis that goes away is reported on stderr at
/// each refresh, and the watch picks up again when it is back.
#[test]
fn status_watch_keeps_going_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut child = watch_status(&dir, &redis.url(), "500ms");
    let stdout = lines_of(&mut child);
    let stderr = {
        let pipe = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        rx
    };
    let (_, first) = stdout
        .recv_timeout(Duration::from_secs(20))
        .expect("a first document");
    assert!(first.contains("\"length\":0"), "{first}");

    redis.kill();
    let error = stderr
        .recv_timeout(Duration::from_secs(20))
        .expect("the outage is reported");
    assert!(
        error.starts_with("error: ") && error.contains("trying again in 500ms"),
        "{error}"
    );
    redis.restart();
    let mut con = redis.connection();
    produce(&mut con, "orders", &[vec![("n", "1".to_owned())]]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Ok((_, line)) = stdout.recv_timeout(Duration::from_millis(200)) {
            let back = line.contains("\"length\":1");
            seen.push(line);
            if back {
                break;
            }
        }
    }
    assert!(
        seen.last().is_some_and(|l| l.contains("\"length\":1")),
        "documents again after the restart: {seen:?}"
    );
    assert!(
        seen.iter().all(|l| l.starts_with('[')),
        "stdout holds only status documents: {seen:?}"
    );
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    assert_eq!(wait_for_exit(&mut child, Duration::from_secs(10)), Some(0));
}

#[test]
fn status_watch_prints_frames_off_a_terminal_and_stops_on_sigterm() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &config(
            &redis.url(),
            "r1",
            "[groups.billing]\nstream = \"orders\"\nhandler = \"noop\"\n",
        ),
    );
    let mut child = Command::new(binary())
        .args(["status", "-c", &path, "--watch", "--interval", "500ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = lines_of(&mut child);
    let mut headers = 0;
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while headers < 2 && Instant::now() < deadline {
        if let Ok((_, line)) = lines.recv_timeout(Duration::from_millis(200)) {
            headers += usize::from(line.starts_with("every 500ms "));
            text.push_str(&line);
            text.push('\n');
        }
    }
    assert!(headers >= 2, "two refreshes:\n{text}");
    assert!(!text.contains('\x1b'), "no screen clearing off a terminal");
    assert!(text.contains("stream orders"), "{text}");
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    assert_eq!(wait_for_exit(&mut child, Duration::from_secs(10)), Some(0));

    // On a terminal (util-linux `script` gives it a pseudo-terminal) each refresh clears
    // the screen and redraws from the top; Ctrl-C (here from `timeout`) ends it with 0.
    if Command::new("script").arg("--version").output().is_ok() {
        let command = format!(
            "timeout --preserve-status -s INT 3 {} status -c {path} --watch --interval 500ms",
            binary()
        );
        let out = Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{:?}: {shown}", out.status);
        let redraws = shown.matches("\x1b[2J\x1b[Hevery 500ms ").count();
        assert!(redraws >= 2, "{redraws} redraws: {shown:?}");
    } else {
        eprintln!("no `script` to make a terminal: the redraw is not checked");
    }

    let (code, _, err) = run_cli(&["status", "-c", &path, "--interval", "1s"], &[]);
    assert_eq!(code, 2, "--interval needs --watch: {err}");
    let (code, _, err) = run_cli(
        &["status", "-c", &path, "--watch", "--interval", "1ms"],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("100ms or more"), "{err}");
}

/// One group's figures in a live line: `… | analytics 398/s lag 0 pending 12 | …`.
fn live_figures(line: &str, group: &str) -> Option<(u64, u64, u64)> {
    let part = line
        .split(" | ")
        .find(|p| p.starts_with(&format!("{group} ")))?;
    let words: Vec<&str> = part.split_whitespace().collect();
    match words.as_slice() {
        [_, rate, "lag", lag, "pending", pending] => Some((
            rate.strip_suffix("/s")?.parse().ok()?,
            lag.parse().ok()?,
            pending.parse().ok()?,
        )),
        _ => None,
    }
}

/// What README promises of `scripts/demo` (15 s): a live line per second with each group's
/// throughput, lag and pending, and an alert that fires and resolves.
#[test]
fn a_15_second_demo_shows_each_groups_throughput_lag_and_pending_and_an_alert_resolving() {
    let server = server_binary();
    let (code, out, err) = run_cli(
        &["demo", "--duration", "15s", "--redis-server", &server],
        &[],
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let live: Vec<&str> = out.lines().filter(|l| l.starts_with("t = ")).collect();
    assert!(live.len() >= 10, "a live line per second:\n{out}");
    let mut best = std::collections::HashMap::new();
    for line in &live {
        for group in ["analytics", "alerts", "warehouse", "learning"] {
            let (rate, _, _) = live_figures(line, group)
                .unwrap_or_else(|| panic!("no `{group} N/s lag N pending N` in {line:?}"));
            let max = best.entry(group).or_insert(0);
            *max = rate.max(*max);
        }
    }
    // 400 events/s to ml_events, 60/s to user:feedback: each group keeps up at some point.
    for (group, at_least) in [
        ("analytics", 200),
        ("alerts", 200),
        ("warehouse", 200),
        ("learning", 30),
    ] {
        assert!(
            best[group] >= at_least,
            "{group} peaked at {}/s:\n{out}",
            best[group]
        );
    }
    assert!(
        out.contains("llm-error-rate firing: ") && out.contains("llm-error-rate resolved: "),
        "the incident's alert fires and resolves within the run:\n{out}"
    );
}
