//! Checks the observability assets in `deploy/`: the Grafana dashboard
//! (`deploy/grafana/streamworker-dashboard.json`) and the Prometheus alerting rules
//! (`deploy/prometheus/alerts.yml`).
//!
//! Every metric they query must be one the daemon exports (DESIGN §5); group gauges, which
//! describe Redis and may come from any replica, must be read through
//! `max by (stream, group)`; counters and histogram series through `rate`/`increase`.
//! The rules, the dashboard's queries and a set of alert scenarios also go through
//! `promtool`, which must be on PATH (Debian: `apt-get install prometheus`; scripts/test
//! installs it): without it those tests fail rather than pass unchecked.

mod common;

use std::collections::{BTreeSet, HashSet};

use serde_json::Value;
use yaml_rust2::Yaml;

use common::{promtool, read, repo_path, require_promtool, yaml_docs};

const DASHBOARD: &str = "deploy/grafana/streamworker-dashboard.json";
const ALERTS: &str = "deploy/prometheus/alerts.yml";

/// Every metric the daemon exports, as PromQL names it (counters with `_total`).
const METRICS: &[&str] = &[
    "streamworker_entries_total",
    "streamworker_handler_seconds",
    "streamworker_end_to_end_seconds",
    "streamworker_inflight",
    "streamworker_reclaimed_total",
    "streamworker_group_recreated_total",
    "streamworker_redis_errors_total",
    "streamworker_up",
    "streamworker_build_info",
    "streamworker_group_lag",
    "streamworker_group_pending",
    "streamworker_group_consumers",
    "streamworker_oldest_pending_seconds",
    "streamworker_dead_letter_length",
    "streamworker_retention_blocked",
    "streamworker_circuit_open",
];

/// Histograms: queried only through their `_bucket`, `_sum` and `_count` series.
const HISTOGRAMS: &[&str] = &[
    "streamworker_handler_seconds",
    "streamworker_end_to_end_seconds",
];

/// Gauges that describe Redis, not a replica: any replica may export them, so every query
/// reads them through `max by (stream, group)`.
const GROUP_GAUGES: &[&str] = &[
    "streamworker_group_lag",
    "streamworker_group_pending",
    "streamworker_group_consumers",
    "streamworker_oldest_pending_seconds",
    "streamworker_dead_letter_length",
    "streamworker_retention_blocked",
];

/// Per-replica gauges of a group: aggregated over replicas with `sum` or `max`.
const REPLICA_GROUP_GAUGES: &[&str] = &["streamworker_circuit_open", "streamworker_inflight"];

const RANGE_FUNCTIONS: &[&str] = &["rate", "irate", "increase"];

const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

// ------------------------------------------------------------------------------------------
// A small PromQL scanner: enough to find metric names and what encloses them.
// ------------------------------------------------------------------------------------------

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':'
}

/// A metric name as written in an expression, and its byte offset.
#[derive(Debug)]
struct Reference {
    name: String,
    at: usize,
}

/// Every `streamworker_…` name in `expr`.
fn references(expr: &str) -> Vec<Reference> {
    let bytes = expr.as_bytes();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(found) = expr[from..].find("streamworker_") {
        let at = from + found;
        let mut end = at + "streamworker_".len();
        while end < bytes.len() && is_name_byte(bytes[end]) {
            end += 1;
        }
        if at == 0 || !is_name_byte(bytes[at - 1]) {
            out.push(Reference {
                name: expr[at..end].to_owned(),
                at,
            });
        }
        from = end;
    }
    out
}

/// The exported metric a name refers to, looking through histogram suffixes.
fn metric_of(name: &str) -> Result<&'static str, String> {
    if let Some(metric) = METRICS.iter().find(|m| **m == name) {
        if HISTOGRAMS.contains(metric) {
            return Err(format!(
                "{name} is a histogram: query {name}_bucket, {name}_sum or {name}_count"
            ));
        }
        return Ok(metric);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && let Some(histogram) = HISTOGRAMS.iter().find(|h| **h == base)
        {
            return Ok(histogram);
        }
    }
    Err(format!("{name} is not a metric streamworker exports"))
}

/// Byte offsets of the `(` still open at `at`, outermost first, ignoring quoted text.
fn open_parens(expr: &str, at: usize) -> Vec<usize> {
    let mut stack = Vec::new();
    let mut quote: Option<u8> = None;
    let mut escaped = false;
    for (i, &b) in expr.as_bytes()[..at].iter().enumerate() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if b == b'\\' && q != b'`' {
                escaped = true;
            } else if b == q {
                quote = None;
            }
            continue;
        }
        match b {
            b'"' | b'\'' | b'`' => quote = Some(b),
            b'(' => stack.push(i),
            b')' => {
                stack.pop();
            }
            _ => {}
        }
    }
    stack
}

/// What a `(` opens.
#[derive(Debug, PartialEq)]
enum Opener {
    /// `op (`, `op by (labels) (` or `op without (labels) (`; `by` is the grouping of `by`.
    Aggregation {
        op: String,
        by: Option<BTreeSet<String>>,
    },
    /// `function(`
    Call(String),
    /// A parenthesised subexpression.
    Bare,
}

fn trailing_identifier(text: &str) -> &str {
    let start = text
        .bytes()
        .rposition(|b| !(b.is_ascii_alphanumeric() || b == b'_'))
        .map_or(0, |p| p + 1);
    &text[start..]
}

fn opener(expr: &str, paren: usize) -> Opener {
    let head = expr[..paren].trim_end();
    if let Some(inside) = head.strip_suffix(')') {
        // `op by (a, b) (` or `op without (a) (`
        let Some(open) = inside.rfind('(') else {
            return Opener::Bare;
        };
        let labels: BTreeSet<String> = inside[open + 1..]
            .split(',')
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect();
        let before = inside[..open].trim_end();
        let keyword = trailing_identifier(before);
        if keyword != "by" && keyword != "without" {
            return Opener::Bare;
        }
        let op = trailing_identifier(before[..before.len() - keyword.len()].trim_end());
        if !AGGREGATIONS.contains(&op) {
            return Opener::Bare;
        }
        return Opener::Aggregation {
            op: op.to_owned(),
            by: (keyword == "by").then_some(labels),
        };
    }
    let identifier = trailing_identifier(head);
    if identifier.is_empty() {
        Opener::Bare
    } else if AGGREGATIONS.contains(&identifier) {
        Opener::Aggregation {
            op: identifier.to_owned(),
            by: None,
        }
    } else {
        Opener::Call(identifier.to_owned())
    }
}

/// What is wrong with one PromQL expression, and the metrics it uses.
fn expr_problems(expr: &str) -> (Vec<String>, BTreeSet<&'static str>) {
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    let stream_group: BTreeSet<String> = ["stream", "group"].map(str::to_owned).into();
    for reference in references(expr) {
        let metric = match metric_of(&reference.name) {
            Ok(metric) => metric,
            Err(problem) => {
                problems.push(problem);
                continue;
            }
        };
        used.insert(metric);
        let openers: Vec<Opener> = open_parens(expr, reference.at)
            .into_iter()
            .map(|p| opener(expr, p))
            .collect();
        let innermost = openers.last();
        let name = &reference.name;
        if GROUP_GAUGES.contains(&metric) {
            let ok = matches!(innermost, Some(Opener::Aggregation { op, by: Some(by) })
                if op == "max" && *by == stream_group);
            if !ok {
                problems.push(format!(
                    "{name} is a group gauge any replica may export: read it through \
                     `max by (stream, group) ({name}…)`, not {innermost:?}"
                ));
            }
        } else if REPLICA_GROUP_GAUGES.contains(&metric) {
            let ok = matches!(innermost, Some(Opener::Aggregation { op, .. })
                if op == "sum" || op == "max");
            if !ok {
                problems.push(format!(
                    "{name} is per replica: aggregate it with sum or max, not {innermost:?}"
                ));
            }
        } else if metric.ends_with("_total") || HISTOGRAMS.contains(&metric) {
            let ok =
                matches!(innermost, Some(Opener::Call(f)) if RANGE_FUNCTIONS.contains(&f.as_str()));
            if !ok {
                problems.push(format!(
                    "{name} is a counter: query it through rate, irate or increase, not \
                     {innermost:?}"
                ));
            }
        }
        if name.ends_with("_bucket") {
            // rate(x_bucket[…]) directly under histogram_quantile, or summed keeping `le`.
            let ok = match openers.len().checked_sub(2).map(|i| &openers[i]) {
                Some(Opener::Call(f)) => f == "histogram_quantile",
                Some(Opener::Aggregation { by: Some(by), .. }) => by.contains("le"),
                _ => false,
            };
            if !ok {
                problems.push(format!(
                    "{name} must be aggregated keeping `le` (sum by (…, le) (rate({name}[…])))"
                ));
            }
        }
    }
    (problems, used)
}

#[test]
fn the_promql_checks_catch_mistakes() {
    let bad = [
        "streamworker_group_lag > 10",
        "max(streamworker_group_lag) > 10",
        "sum by (stream, group) (streamworker_group_lag)",
        "max by (stream) (streamworker_group_pending)",
        "max by (stream, group, instance) (streamworker_dead_letter_length)",
        "delta(streamworker_dead_letter_length[1h])",
        "streamworker_entries_total",
        "sum by (stream, group) (streamworker_reclaimed_total)",
        "streamworker_entries{outcome=\"acked\"}",
        "streamworker_group_lagging",
        "rate(streamworker_handler_seconds[5m])",
        "streamworker_handler_seconds_total",
        "histogram_quantile(0.9, sum by (stream) (rate(streamworker_handler_seconds_bucket[5m])))",
        "streamworker_circuit_open == 1",
        "count by (stream, group) (streamworker_circuit_open)",
    ];
    for expr in bad {
        let (problems, _) = expr_problems(expr);
        assert!(!problems.is_empty(), "no problem found in {expr}");
    }
    let good = [
        "max by (stream, group) (streamworker_group_lag) > 10",
        "max by (group, stream) (streamworker_group_lag{group=~\"(a|b)\"}) > 10",
        "delta((max by (stream, group) (streamworker_dead_letter_length))[1h:1m])",
        "sum by (stream, group) (rate(streamworker_entries_total{group=~\"a)\"}[5m]))",
        "histogram_quantile(0.9, sum by (stream, le) (rate(streamworker_handler_seconds_bucket[5m])))",
        "histogram_quantile(0.9, rate(streamworker_end_to_end_seconds_bucket[5m]))",
        "sum(rate(streamworker_handler_seconds_sum[5m])) / sum(rate(streamworker_handler_seconds_count[5m]))",
        "sum(streamworker_circuit_open)",
        "streamworker_up == 0",
        "count by (version) (streamworker_build_info)",
    ];
    for expr in good {
        let (problems, used) = expr_problems(expr);
        assert!(problems.is_empty(), "{expr}: {problems:?}");
        assert_eq!(used.len(), 1, "{expr}: {used:?}");
    }
}

// ------------------------------------------------------------------------------------------
// The dashboard.
// ------------------------------------------------------------------------------------------

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"]
        .as_array()
        .expect("`panels` is an array")
    {
        out.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

/// Every query a panel runs: (where, expr).
fn panel_exprs(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default().to_owned();
            out.push((
                format!(
                    "panel {} ({}) {}",
                    panel["id"], panel["title"], target["refId"]
                ),
                expr,
            ));
        }
    }
    out
}

fn variable<'a>(dashboard: &'a Value, name: &str) -> &'a Value {
    dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list is an array")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no template variable `{name}`"))
}

/// A query variable's query, in either of Grafana's shapes.
fn variable_query(variable: &Value) -> &str {
    variable["query"]
        .as_str()
        .or_else(|| variable["query"]["query"].as_str())
        .unwrap_or_else(|| panic!("variable {} has no query", variable["name"]))
}

fn walk<'a>(value: &'a Value, visit: &mut dyn FnMut(&'a Value)) {
    visit(value);
    match value {
        Value::Array(items) => items.iter().for_each(|v| walk(v, visit)),
        Value::Object(map) => map.values().for_each(|v| walk(v, visit)),
        _ => {}
    }
}

#[test]
fn dashboard_is_a_grafana_dashboard_with_a_datasource_variable() {
    let dashboard = dashboard();
    let schema = dashboard["schemaVersion"]
        .as_u64()
        .expect("schemaVersion is a number");
    assert!(schema >= 36, "schemaVersion {schema} < 36");
    for key in ["uid", "title"] {
        assert!(
            dashboard[key].as_str().is_some_and(|s| !s.is_empty()),
            "dashboard has no {key}"
        );
    }

    let datasource = variable(&dashboard, "datasource");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");
    for (name, label) in [("stream", "stream"), ("group", "group")] {
        let var = variable(&dashboard, name);
        assert_eq!(var["type"], "query", "variable {name}");
        assert_eq!(var["datasource"]["uid"], "${datasource}", "variable {name}");
        let query = variable_query(var);
        assert!(
            query.starts_with("label_values(") && query.ends_with(&format!(", {label})")),
            "variable {name}: {query}"
        );
    }

    // No datasource is hard-coded: everything goes through ${datasource}.
    let mut hard_coded = Vec::new();
    walk(&dashboard, &mut |value| {
        if let Some(uid) = value["datasource"]["uid"].as_str()
            && uid != "${datasource}"
            && uid != "-- Grafana --"
        {
            hard_coded.push(uid.to_owned());
        }
    });
    assert!(
        hard_coded.is_empty(),
        "hard-coded datasources: {hard_coded:?}"
    );
}

#[test]
fn dashboard_panels_have_unique_ids_and_a_non_overlapping_layout() {
    let dashboard = dashboard();
    let all = panels(&dashboard);
    assert!(all.len() > 10, "only {} panels", all.len());
    let mut ids = HashSet::new();
    for panel in &all {
        let id = panel["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel without a numeric id: {}", panel["title"]));
        assert!(ids.insert(id), "duplicate panel id {id}");
        let grid = &panel["gridPos"];
        let [x, _y, w, h] = ["x", "y", "w", "h"].map(|k| {
            grid[k]
                .as_u64()
                .unwrap_or_else(|| panic!("panel {id}: gridPos.{k} missing"))
        });
        assert!(w >= 1 && h >= 1, "panel {id}: empty gridPos");
        assert!(x + w <= 24, "panel {id}: wider than the 24-column grid");
        assert!(
            panel["title"].as_str().is_some_and(|t| !t.is_empty()),
            "panel {id} has no title"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {id} datasource"
        );
        let targets = panel["targets"]
            .as_array()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| panic!("panel {id} has no targets"));
        let mut ref_ids = HashSet::new();
        for target in targets {
            assert!(
                target["expr"]
                    .as_str()
                    .is_some_and(|e| !e.trim().is_empty()),
                "panel {id}: target without expr"
            );
            let ref_id = target["refId"].as_str().expect("refId");
            assert!(
                ref_ids.insert(ref_id),
                "panel {id}: duplicate refId {ref_id}"
            );
        }
    }

    // Top-level panels (collapsed rows keep theirs inside) must not overlap.
    let top: Vec<(u64, [u64; 4])> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let g = &p["gridPos"];
            (
                p["id"].as_u64().unwrap(),
                ["x", "y", "w", "h"].map(|k| g[k].as_u64().unwrap()),
            )
        })
        .collect();
    for (i, (a, [ax, ay, aw, ah])) in top.iter().enumerate() {
        for (b, [bx, by, bw, bh]) in &top[i + 1..] {
            let overlap = ax < &(bx + bw) && bx < &(ax + aw) && ay < &(by + bh) && by < &(ay + ah);
            assert!(!overlap, "panels {a} and {b} overlap");
        }
    }
}

#[test]
fn dashboard_queries_exported_metrics_aggregated_the_right_way() {
    let dashboard = dashboard();
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for (place, expr) in panel_exprs(&dashboard) {
        let (found, metrics) = expr_problems(&expr);
        problems.extend(found.into_iter().map(|p| format!("{place}: {p}")));
        used.extend(metrics);
    }
    // Template variable queries are not PromQL; only their metric names are checked.
    for name in ["stream", "group"] {
        for reference in references(variable_query(variable(&dashboard, name))) {
            if let Err(p) = metric_of(&reference.name) {
                problems.push(format!("variable {name}: {p}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let missing: Vec<_> = METRICS.iter().filter(|m| !used.contains(*m)).collect();
    assert!(missing.is_empty(), "no panel shows {missing:?}");
}

#[test]
fn dashboard_shows_the_latency_quantiles() {
    let exprs: Vec<String> = panel_exprs(&dashboard())
        .into_iter()
        .map(|(_, e)| e.split_whitespace().collect::<String>())
        .collect();
    for (histogram, quantiles) in [
        (
            "streamworker_handler_seconds_bucket",
            &["0.5", "0.95", "0.99"][..],
        ),
        (
            "streamworker_end_to_end_seconds_bucket",
            &["0.5", "0.99"][..],
        ),
    ] {
        for q in quantiles {
            let call = format!("histogram_quantile({q},");
            assert!(
                exprs
                    .iter()
                    .any(|e| e.contains(&call) && e.contains(histogram)),
                "no panel shows the {q} quantile of {histogram}"
            );
        }
    }
    assert!(
        exprs
            .iter()
            .any(|e| e.contains("streamworker_entries_total") && e.contains("by(outcome)")),
        "no panel shows throughput by outcome"
    );
}

// ------------------------------------------------------------------------------------------
// The alerting rules.
// ------------------------------------------------------------------------------------------

fn alert_rules() -> Vec<Yaml> {
    let docs = yaml_docs(&repo_path(ALERTS));
    assert_eq!(docs.len(), 1, "{ALERTS} holds one YAML document");
    let groups = docs[0]["groups"]
        .as_vec()
        .unwrap_or_else(|| panic!("{ALERTS}: no `groups:` list"));
    assert!(!groups.is_empty(), "{ALERTS}: no groups");
    let mut names = HashSet::new();
    let mut rules = Vec::new();
    for group in groups {
        let name = group["name"].as_str().expect("every group has a name");
        assert!(names.insert(name.to_owned()), "duplicate group {name}");
        for key in group.as_hash().expect("a group is a mapping").keys() {
            let key = key.as_str().unwrap_or_default();
            assert!(
                ["name", "interval", "limit", "rules"].contains(&key),
                "group {name}: unknown key {key}"
            );
        }
        let group_rules = group["rules"]
            .as_vec()
            .unwrap_or_else(|| panic!("group {name}: no `rules:` list"));
        assert!(!group_rules.is_empty(), "group {name}: no rules");
        rules.extend(group_rules.iter().cloned());
    }
    rules
}

/// A Prometheus duration: `1h30m`, `10m`, `0s`, units in decreasing order.
fn is_prometheus_duration(text: &str) -> bool {
    const UNITS: [&str; 7] = ["y", "w", "d", "h", "m", "s", "ms"];
    let mut rest = text;
    let mut last_unit = None;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let unit = if rest.starts_with("ms") {
            "ms"
        } else {
            &rest[..rest.chars().next().map_or(0, char::len_utf8)]
        };
        let Some(index) = UNITS.iter().position(|u| *u == unit) else {
            return false;
        };
        if last_unit.is_some_and(|last| index <= last) {
            return false;
        }
        last_unit = Some(index);
        rest = &rest[unit.len()..];
    }
    true
}

#[test]
fn the_duration_check_catches_mistakes() {
    for good in ["10m", "0m", "1h30m", "90s", "1d", "500ms"] {
        assert!(is_prometheus_duration(good), "{good}");
    }
    for bad in ["", "10", "m", "10 m", "10min", "30m1h", "1.5h"] {
        assert!(!is_prometheus_duration(bad), "{bad}");
    }
}

fn rule_name(rule: &Yaml) -> String {
    rule["alert"]
        .as_str()
        .map_or_else(|| format!("{rule:?}"), str::to_owned)
}

#[test]
fn alert_rules_have_the_prometheus_schema() {
    let mut names = HashSet::new();
    for rule in alert_rules() {
        let name = rule_name(&rule);
        let hash = rule
            .as_hash()
            .unwrap_or_else(|| panic!("{name}: not a mapping"));
        for key in hash.keys() {
            let key = key.as_str().unwrap_or_default();
            assert!(
                [
                    "alert",
                    "expr",
                    "for",
                    "keep_firing_for",
                    "labels",
                    "annotations"
                ]
                .contains(&key),
                "{name}: unexpected key {key}"
            );
        }
        assert!(
            rule["alert"]
                .as_str()
                .is_some_and(|a| a.starts_with("Streamworker")
                    && a.len() > "Streamworker".len()
                    && a.chars().all(|c| c.is_ascii_alphanumeric())),
            "{name}: alert must be a CamelCase name starting with Streamworker"
        );
        assert!(names.insert(name.clone()), "duplicate alert {name}");
        assert!(
            rule["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
            "{name}: no expr"
        );
        let for_ = rule["for"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no `for:` duration"));
        assert!(is_prometheus_duration(for_), "{name}: bad `for: {for_}`");
        let severity = rule["labels"]["severity"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no labels.severity"));
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "{name}: severity {severity}"
        );
        for key in ["summary", "description"] {
            assert!(
                rule["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.trim().is_empty()),
                "{name}: no annotations.{key}"
            );
        }
        for section in ["labels", "annotations"] {
            for (key, value) in rule[section].as_hash().into_iter().flatten() {
                assert!(
                    key.as_str().is_some() && value.as_str().is_some(),
                    "{name}: {section} must map strings to strings ({key:?}: {value:?})"
                );
            }
        }
    }
    assert!(names.len() >= 7, "only {} alerts", names.len());
}

#[test]
fn alert_rules_query_exported_metrics_aggregated_the_right_way() {
    let rules = alert_rules();
    let mut problems = Vec::new();
    let exprs: Vec<(String, String)> = rules
        .iter()
        .map(|r| {
            let expr = r["expr"].as_str().unwrap_or_default();
            (
                rule_name(r),
                expr.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect();
    for (name, expr) in &exprs {
        let (found, _) = expr_problems(expr);
        problems.extend(found.into_iter().map(|p| format!("{name}: {p}")));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    let any = |what: &str, test: &dyn Fn(&str) -> bool| {
        assert!(exprs.iter().any(|(_, e)| test(e)), "no alert for {what}");
    };
    any("lag above a threshold", &|e| {
        e.contains("(streamworker_group_lag) >")
    });
    any("dead letters growing", &|e| {
        (e.contains("increase(") && e.contains(r#"outcome="dead_lettered""#))
            || ((e.contains("delta(") || e.contains("deriv("))
                && e.contains("streamworker_dead_letter_length"))
    });
    any("no consumers while lag > 0", &|e| {
        e.contains("streamworker_group_consumers") && e.contains("streamworker_group_lag")
    });
    any("the oldest pending entry", &|e| {
        e.contains("streamworker_oldest_pending_seconds")
    });
    any("a replica down", &|e| e.contains("streamworker_up == 0"));
    any("no replica at all", &|e| {
        e.contains("absent(streamworker_up)")
    });
    any("Redis errors", &|e| {
        e.contains("streamworker_redis_errors_total")
    });
    any("an open circuit", &|e| {
        e.contains("streamworker_circuit_open")
    });
    any("retention blocked", &|e| {
        e.contains("streamworker_retention_blocked")
    });
}

// ------------------------------------------------------------------------------------------
// promtool (Debian: `apt-get install prometheus`); a missing promtool fails these tests.
// ------------------------------------------------------------------------------------------

#[test]
fn promtool_checks_the_alert_rules() {
    require_promtool("promtool check rules");
    println!(
        "{}",
        promtool(&["check", "rules", repo_path(ALERTS).to_str().unwrap()])
    );
}

#[test]
fn promtool_parses_every_dashboard_query() {
    require_promtool("promtool check rules (dashboard queries)");
    // Each query becomes a recording rule, with Grafana's variables replaced by values.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for panel in panels(&dashboard()) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let mut expr = target["expr"].as_str().unwrap_or_default().to_owned();
            for (variable, value) in [
                ("$__rate_interval", "5m"),
                ("$__interval", "1m"),
                ("$__range", "1h"),
                ("${stream}", ".*"),
                ("$stream", ".*"),
                ("${group}", ".*"),
                ("$group", ".*"),
            ] {
                expr = expr.replace(variable, value);
            }
            assert!(!expr.contains('$'), "unknown variable in {expr}");
            let record = format!(
                "dashboard:panel_{}:{}",
                panel["id"],
                target["refId"].as_str().unwrap_or("A")
            );
            rules.push_str(&format!(
                "      - record: {record}\n        expr: {}\n",
                serde_json::to_string(&expr).unwrap()
            ));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard-queries.yml");
    std::fs::write(&path, rules).unwrap();
    println!("{}", promtool(&["check", "rules", path.to_str().unwrap()]));
}

/// Alert scenarios for `promtool test rules`: series as replicas export them, and the
/// alerts (ALERTS series) expected to be firing at a given time.
const SCENARIOS: &str = r#"
evaluation_interval: 1m
tests:
  # Lag: the group gauge is exported by two replicas with different ages; `max` wins and
  # the alert carries no instance label. A group below the threshold, and every other
  # alert, stay quiet.
  - interval: 1m
    input_series:
      - series: 'streamworker_group_lag{stream="s",group="g",instance="a"}'
        values: '20000x30'
      - series: 'streamworker_group_lag{stream="s",group="g",instance="b"}'
        values: '5000x30'
      - series: 'streamworker_group_lag{stream="s",group="quiet",instance="a"}'
        values: '5000x30'
      - series: 'streamworker_entries_total{stream="s",group="g",outcome="acked",instance="a"}'
        values: '0+1000x30'
      - series: 'streamworker_entries_total{stream="s",group="quiet",outcome="acked",instance="a"}'
        values: '0+1000x30'
      - series: 'streamworker_group_consumers{stream="s",group="g",instance="a"}'
        values: '2x30'
      - series: 'streamworker_group_consumers{stream="s",group="quiet",instance="a"}'
        values: '2x30'
      - series: 'streamworker_up{instance="a"}'
        values: '1x30'
    promql_expr_test:
      - expr: 'ALERTS{alertname="StreamworkerLagHigh",alertstate="firing"}'
        eval_time: 5m
        exp_samples: []
      - expr: 'ALERTS{alertstate="firing"}'
        eval_time: 12m
        exp_samples:
          - labels: 'ALERTS{alertname="StreamworkerLagHigh",alertstate="firing",stream="s",group="g",severity="warning"}'
            value: 1

  # No consumers while entries wait; a group with consumers, or without lag, stays quiet.
  - interval: 1m
    input_series:
      - series: 'streamworker_group_consumers{stream="s",group="orphan",instance="a"}'
        values: '0x20'
      - series: 'streamworker_group_lag{stream="s",group="orphan",instance="a"}'
        values: '3x20'
      - series: 'streamworker_group_consumers{stream="s",group="served",instance="a"}'
        values: '2x20'
      - series: 'streamworker_group_lag{stream="s",group="served",instance="a"}'
        values: '3x20'
      - series: 'streamworker_group_consumers{stream="s",group="idle",instance="a"}'
        values: '0x20'
      - series: 'streamworker_group_lag{stream="s",group="idle",instance="a"}'
        values: '0x20'
    promql_expr_test:
      - expr: 'ALERTS{alertname="StreamworkerNoConsumers",alertstate="firing"}'
        eval_time: 4m
        exp_samples: []
      - expr: 'ALERTS{alertname="StreamworkerNoConsumers",alertstate="firing"}'
        eval_time: 6m
        exp_samples:
          - labels: 'ALERTS{alertname="StreamworkerNoConsumers",alertstate="firing",stream="s",group="orphan",severity="critical"}'
            value: 1

  # A stalled group (lag, nothing settled) and a pending entry nobody reclaims; a group
  # that keeps acknowledging stays quiet.
  - interval: 1m
    input_series:
      - series: 'streamworker_group_lag{stream="s",group="stuck",instance="a"}'
        values: '50x30'
      - series: 'streamworker_entries_total{stream="s",group="stuck",outcome="acked",instance="a"}'
        values: '5x30'
      - series: 'streamworker_oldest_pending_seconds{stream="s",group="stuck",instance="a"}'
        values: '1000+60x30'
      - series: 'streamworker_oldest_pending_seconds{stream="s",group="stuck",instance="b"}'
        values: '100x30'
      - series: 'streamworker_group_lag{stream="s",group="busy",instance="a"}'
        values: '50x30'
      - series: 'streamworker_entries_total{stream="s",group="busy",outcome="acked",instance="a"}'
        values: '0+10x30'
      - series: 'streamworker_oldest_pending_seconds{stream="s",group="busy",instance="a"}'
        values: '30x30'
    promql_expr_test:
      - expr: 'ALERTS{alertname=~"StreamworkerGroupStalled|StreamworkerOldestPendingTooOld",alertstate="firing"}'
        eval_time: 20m
        exp_samples:
          - labels: 'ALERTS{alertname="StreamworkerGroupStalled",alertstate="firing",stream="s",group="stuck",severity="critical"}'
            value: 1
          - labels: 'ALERTS{alertname="StreamworkerOldestPendingTooOld",alertstate="firing",stream="s",group="stuck",severity="warning"}'
            value: 1

  # Dead letters: a trickle warns; a large share is critical; a growing dead-letter
  # stream (exported by two replicas) warns once per group.
  - interval: 1m
    input_series:
      - series: 'streamworker_entries_total{stream="s",group="trickle",outcome="dead_lettered",instance="a"}'
        values: '0+1x40'
      - series: 'streamworker_entries_total{stream="s",group="trickle",outcome="acked",instance="a"}'
        values: '0+100x40'
      - series: 'streamworker_entries_total{stream="s",group="flood",outcome="dead_lettered",instance="a"}'
        values: '0+10x40'
      - series: 'streamworker_entries_total{stream="s",group="flood",outcome="acked",instance="a"}'
        values: '0+10x40'
      - series: 'streamworker_entries_total{stream="s",group="clean",outcome="dead_lettered",instance="a"}'
        values: '0x40'
      - series: 'streamworker_entries_total{stream="s",group="clean",outcome="acked",instance="a"}'
        values: '0+100x40'
      - series: 'streamworker_dead_letter_length{stream="s",group="flood",instance="a"}'
        values: '0+10x40'
      - series: 'streamworker_dead_letter_length{stream="s",group="flood",instance="b"}'
        values: '0+10x40'
      - series: 'streamworker_dead_letter_length{stream="s",group="trickle",instance="a"}'
        values: '0+1x40'
    promql_expr_test:
      - expr: 'ALERTS{alertname=~"StreamworkerDeadLetter.*",alertstate="firing"}'
        eval_time: 35m
        exp_samples:
          - labels: 'ALERTS{alertname="StreamworkerDeadLettering",alertstate="firing",stream="s",group="trickle",severity="warning"}'
            value: 1
          - labels: 'ALERTS{alertname="StreamworkerDeadLettering",alertstate="firing",stream="s",group="flood",severity="warning"}'
            value: 1
          - labels: 'ALERTS{alertname="StreamworkerDeadLetterRatioHigh",alertstate="firing",stream="s",group="flood",severity="critical"}'
            value: 1
          - labels: 'ALERTS{alertname="StreamworkerDeadLetterStreamGrowing",alertstate="firing",stream="s",group="flood",severity="warning"}'
            value: 1

  # Replicas: one goes down, Redis errors pile up on it, a group gets recreated.
  - interval: 1m
    input_series:
      - series: 'streamworker_up{instance="a",job="streamworker"}'
        values: '1x10 0x10'
      - series: 'streamworker_up{instance="b",job="streamworker"}'
        values: '1x20'
      - series: 'streamworker_redis_errors_total{kind="unavailable",instance="a",job="streamworker"}'
        values: '0x5 0+120x15'
      - series: 'streamworker_group_recreated_total{stream="s",group="g",instance="b",job="streamworker"}'
        values: '0x15 1x5'
    promql_expr_test:
      - expr: 'ALERTS{alertstate="firing"}'
        eval_time: 8m
        exp_samples: []
      - expr: 'ALERTS{alertstate="firing"}'
        eval_time: 19m
        exp_samples:
          - labels: 'ALERTS{alertname="StreamworkerDown",alertstate="firing",instance="a",job="streamworker",severity="critical"}'
            value: 1
          - labels: 'ALERTS{alertname="StreamworkerRedisErrors",alertstate="firing",instance="a",kind="unavailable",severity="warning"}'
            value: 1
          - labels: 'ALERTS{alertname="StreamworkerGroupRecreated",alertstate="firing",stream="s",group="g",severity="warning"}'
            value: 1

  # No replica: every replica down, or none scraped at all.
  - interval: 1m
    input_series:
      - series: 'streamworker_up{instance="a"}'
        values: '0x20'
    promql_expr_test:
      - expr: 'ALERTS{alertname="StreamworkerAbsent",alertstate="firing"}'
        eval_time: 6m
        exp_samples:
          - labels: 'ALERTS{alertname="StreamworkerAbsent",alertstate="firing",severity="critical"}'
            value: 1
  - interval: 1m
    input_series:
      - series: 'streamworker_inflight{stream="s",group="g",instance="a"}'
        values: '0x20'
    promql_expr_test:
      - expr: 'ALERTS{alertname="StreamworkerAbsent",alertstate="firing"}'
        eval_time: 6m
        exp_samples:
          - labels: 'ALERTS{alertname="StreamworkerAbsent",alertstate="firing",severity="critical"}'
            value: 1

  # Circuit breakers (per replica, summed) and a group blocking retention (any replica).
  - interval: 1m
    input_series:
      - series: 'streamworker_circuit_open{stream="s",group="g",instance="a"}'
        values: '1x70'
      - series: 'streamworker_circuit_open{stream="s",group="g",instance="b"}'
        values: '1x70'
      - series: 'streamworker_circuit_open{stream="s",group="ok",instance="a"}'
        values: '0x70'
      - series: 'streamworker_retention_blocked{stream="s",group="g",instance="a"}'
        values: '1x70'
      - series: 'streamworker_retention_blocked{stream="s",group="g",instance="b"}'
        values: '1x70'
    promql_expr_test:
      - expr: 'ALERTS{alertname=~"StreamworkerCircuitOpen|StreamworkerRetentionBlocked",alertstate="firing"}'
        eval_time: 30m
        exp_samples:
          - labels: 'ALERTS{alertname="StreamworkerCircuitOpen",alertstate="firing",stream="s",group="g",severity="warning"}'
            value: 1
      - expr: 'ALERTS{alertname=~"StreamworkerCircuitOpen|StreamworkerRetentionBlocked",alertstate="firing"}'
        eval_time: 65m
        exp_samples:
          - labels: 'ALERTS{alertname="StreamworkerCircuitOpen",alertstate="firing",stream="s",group="g",severity="warning"}'
            value: 1
          - labels: 'ALERTS{alertname="StreamworkerRetentionBlocked",alertstate="firing",stream="s",group="g",severity="warning"}'
            value: 1
"#;

#[test]
fn promtool_alert_scenarios_fire_as_expected() {
    require_promtool("promtool test rules");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alerts-test.yml");
    let rules = repo_path(ALERTS);
    std::fs::write(
        &path,
        format!(
            "rule_files:\n  - {}\n{SCENARIOS}",
            serde_json::to_string(rules.to_str().unwrap()).unwrap()
        ),
    )
    .unwrap();
    println!("{}", promtool(&["test", "rules", path.to_str().unwrap()]));
}

// ------------------------------------------------------------------------------------------
// The KEDA query for a partitioned group (deploy/kubernetes/examples/keda-partitioned.yaml).
// ------------------------------------------------------------------------------------------

const KEDA_PARTITIONED: &str = "deploy/kubernetes/examples/keda-partitioned.yaml";

/// The example ScaledObject's prometheus query.
fn keda_partitioned_query() -> String {
    let docs = yaml_docs(&repo_path(KEDA_PARTITIONED));
    docs[0]["spec"]["triggers"][0]["metadata"]["query"]
        .as_str()
        .unwrap_or_else(|| panic!("{KEDA_PARTITIONED}: no prometheus query"))
        .to_owned()
}

#[test]
fn the_partitioned_keda_query_reads_the_group_gauge_the_right_way() {
    let query = keda_partitioned_query();
    let (problems, used) = expr_problems(&query);
    assert!(problems.is_empty(), "{query}: {}", problems.join("\n"));
    assert_eq!(used, BTreeSet::from(["streamworker_group_lag"]));
}

/// Two replicas export the lag of all four partitions (the same figures, read a moment
/// apart), a third replica of another group exports its own: the query is the group's
/// backlog, each partition counted once.
#[test]
fn promtool_evaluates_the_partitioned_keda_query_to_the_groups_backlog() {
    require_promtool("promtool test rules");
    let query = keda_partitioned_query();
    let mut series = String::new();
    for (instance, lags) in [("a", [3, 0, 5, 9]), ("b", [3, 0, 4, 9])] {
        for (p, lag) in lags.iter().enumerate() {
            series.push_str(&format!(
                "      - series: 'streamworker_group_lag{{instance=\"{instance}\",group=\"billing\",stream=\"orders:p{p}\"}}'\n        values: '{lag}x10'\n"
            ));
        }
    }
    series.push_str(
        "      - series: 'streamworker_group_lag{instance=\"c\",group=\"shipping\",stream=\"orders\"}'\n        values: '100x10'\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("none.yml");
    std::fs::write(&rules, "groups: []\n").unwrap();
    let test = dir.path().join("keda-test.yml");
    std::fs::write(
        &test,
        format!(
            "rule_files:\n  - {}\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{series}    promql_expr_test:\n      - expr: {}\n        eval_time: 5m\n        exp_samples:\n          - labels: '{{}}'\n            value: 17\n",
            serde_json::to_string(rules.to_str().unwrap()).unwrap(),
            serde_json::to_string(&query).unwrap(),
        ),
    )
    .unwrap();
    println!("{}", promtool(&["test", "rules", test.to_str().unwrap()]));
}
