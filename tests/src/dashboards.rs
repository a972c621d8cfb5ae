//! The Grafana dashboards of `dashboards/`, read the way the tests check them: their panels,
//! queries and template variables, the metric names and label filters inside each PromQL
//! expression (a small tokenizer, below), and the variables substituted with what a user picks.
//!
//! The unit tests at the end check the shipped dashboards without any service (shape, metric
//! names against ragent's catalogue and the README, filters by `$cluster`, `$node` and
//! `$namespace`); `tests/e2e/dashboards.rs` runs every query against a real Prometheus.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde_json::Value;

/// The datasource every panel, target and query variable names: the dashboard's variable.
pub const DATASOURCE_UID: &str = "${datasource}";

/// One dashboard file.
#[derive(Debug, Clone)]
pub struct Dashboard {
    pub path: PathBuf,
    pub json: Value,
}

/// One PromQL query of a panel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub panel_id: i64,
    pub panel: String,
    pub ref_id: String,
    pub expr: String,
    pub legend: String,
    /// An instant query (stat panels); else Grafana asks for a range.
    pub instant: bool,
}

/// A template variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    pub name: String,
    pub kind: String,
    /// The query of a `query` variable (`label_values(...)`).
    pub query: Option<String>,
}

impl Dashboard {
    pub fn load(path: &Path) -> Result<Dashboard> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let json = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        Ok(Dashboard {
            path: path.to_path_buf(),
            json,
        })
    }

    /// Every `*.json` of a directory, by file name.
    pub fn load_dir(dir: &Path) -> Result<Vec<Dashboard>> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        paths.sort();
        paths.iter().map(|p| Dashboard::load(p)).collect()
    }

    /// The file name, for messages.
    pub fn file(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    pub fn uid(&self) -> &str {
        self.json["uid"].as_str().unwrap_or("")
    }

    pub fn title(&self) -> &str {
        self.json["title"].as_str().unwrap_or("")
    }

    /// Every panel, those inside collapsed rows included.
    pub fn panels(&self) -> Vec<&Value> {
        let mut out = Vec::new();
        for p in self.json["panels"].as_array().into_iter().flatten() {
            out.push(p);
            for inner in p["panels"].as_array().into_iter().flatten() {
                out.push(inner);
            }
        }
        out
    }

    /// Every query of every panel.
    pub fn queries(&self) -> Vec<Query> {
        let mut out = Vec::new();
        for p in self.panels() {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push(Query {
                    panel_id: p["id"].as_i64().unwrap_or(-1),
                    panel: p["title"].as_str().unwrap_or("").to_string(),
                    ref_id: t["refId"].as_str().unwrap_or("").to_string(),
                    expr: t["expr"].as_str().unwrap_or("").to_string(),
                    legend: t["legendFormat"].as_str().unwrap_or("").to_string(),
                    instant: t["instant"].as_bool().unwrap_or(false)
                        && !t["range"].as_bool().unwrap_or(false),
                });
            }
        }
        out
    }

    pub fn variables(&self) -> Vec<Variable> {
        self.json["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| Variable {
                name: v["name"].as_str().unwrap_or("").to_string(),
                kind: v["type"].as_str().unwrap_or("").to_string(),
                query: match &v["query"] {
                    Value::String(s) if v["type"] == "query" => Some(s.clone()),
                    Value::Object(o) if v["type"] == "query" => {
                        o.get("query").and_then(|q| q.as_str()).map(str::to_string)
                    }
                    _ => None,
                },
            })
            .collect()
    }

    /// What is wrong with the JSON model, one sentence each (empty: nothing).
    pub fn shape_problems(&self) -> Vec<String> {
        let mut bad = Vec::new();
        let file = self.file();
        let mut say = |s: String| bad.push(format!("{file}: {s}"));
        let j = &self.json;
        for key in ["uid", "title"] {
            if j[key].as_str().is_none_or(str::is_empty) {
                say(format!("no {key}"));
            }
        }
        if j["schemaVersion"].as_i64().is_none_or(|v| v < 36) {
            say("schemaVersion missing or older than 36 (Grafana 9)".into());
        }
        if !j["tags"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t == "ragent"))
        {
            say("tags must include \"ragent\" (the dashboards link to each other by it)".into());
        }
        if j["time"]["from"].as_str().is_none() || j["time"]["to"].as_str().is_none() {
            say("no time range (time.from, time.to)".into());
        }
        let mut ids = BTreeSet::new();
        let mut cells: BTreeMap<(i64, i64), String> = BTreeMap::new();
        for p in j["panels"].as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("").to_string();
            let kind = p["type"].as_str().unwrap_or("");
            if kind.is_empty() {
                say(format!("panel {title:?} has no type"));
            }
            if title.is_empty() {
                say(format!("a {kind} panel has no title"));
            }
            match p["id"].as_i64() {
                Some(id) if !ids.insert(id) => say(format!("panel id {id} is used twice")),
                None => say(format!("panel {title:?} has no id")),
                _ => {}
            }
            let g = &p["gridPos"];
            let (x, y, w, h) = (
                g["x"].as_i64(),
                g["y"].as_i64(),
                g["w"].as_i64(),
                g["h"].as_i64(),
            );
            let (Some(x), Some(y), Some(w), Some(h)) = (x, y, w, h) else {
                say(format!(
                    "panel {title:?} has no complete gridPos (x, y, w, h)"
                ));
                continue;
            };
            if x < 0 || y < 0 || w < 1 || h < 1 || x + w > 24 {
                say(format!(
                    "panel {title:?}: gridPos {x},{y} {w}x{h} is outside the 24-column grid"
                ));
            }
            let mut overlaps = BTreeSet::new();
            for cx in x..(x + w).min(24) {
                for cy in y..y + h {
                    if let Some(other) = cells.insert((cx, cy), title.clone()) {
                        overlaps.insert(other);
                    }
                }
            }
            for other in overlaps {
                say(format!("panels {other:?} and {title:?} overlap"));
            }
            if kind == "row" {
                if p["panels"].as_array().is_some_and(|a| !a.is_empty()) {
                    say(format!(
                        "row {title:?} is collapsed: keep rows open so every panel is in view"
                    ));
                }
                continue;
            }
            if p["datasource"]["uid"] != DATASOURCE_UID || p["datasource"]["type"] != "prometheus" {
                say(format!(
                    "panel {title:?}: datasource must be {{\"type\": \"prometheus\", \"uid\": \"{DATASOURCE_UID}\"}}"
                ));
            }
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            if targets.is_empty() {
                say(format!("panel {title:?} has no targets"));
            }
            let mut refs = BTreeSet::new();
            for t in &targets {
                let r = t["refId"].as_str().unwrap_or("");
                if r.is_empty() || !refs.insert(r.to_string()) {
                    say(format!(
                        "panel {title:?}: every target needs its own refId (got {r:?})"
                    ));
                }
                if t["expr"].as_str().is_none_or(|e| e.trim().is_empty()) {
                    say(format!("panel {title:?} target {r}: no expr"));
                }
                if t["datasource"]["uid"] != DATASOURCE_UID {
                    say(format!(
                        "panel {title:?} target {r}: datasource uid must be {DATASOURCE_UID}"
                    ));
                }
            }
        }
        bad
    }
}

/// A metric selector inside an expression: the metric's name and its label matchers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    pub metric: String,
    pub matchers: Vec<Matcher>,
}

/// `label op "value"`, the value as written (escapes kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matcher {
    pub label: String,
    pub op: String,
    pub value: String,
}

/// PromQL's aggregation operators.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
];

/// PromQL's functions (Prometheus 2.42), and `start()`/`end()` of the `@` modifier.
const FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atanh",
    "avg_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "cos",
    "cosh",
    "count_over_time",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "deg",
    "delta",
    "deriv",
    "exp",
    "floor",
    "histogram_count",
    "histogram_fraction",
    "histogram_quantile",
    "histogram_sum",
    "holt_winters",
    "hour",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "max_over_time",
    "min_over_time",
    "minute",
    "month",
    "pi",
    "predict_linear",
    "present_over_time",
    "quantile_over_time",
    "rad",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sin",
    "sinh",
    "sort",
    "sort_desc",
    "sqrt",
    "stddev_over_time",
    "stdvar_over_time",
    "sum_over_time",
    "tan",
    "tanh",
    "time",
    "timestamp",
    "vector",
    "year",
    "start",
    "end",
];

/// Keywords that are followed by a list of label names in parentheses.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Other words that are never metric names.
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    is_ident_start(c) || c.is_ascii_digit()
}

/// The end (exclusive) of the string literal starting at `i` (a quote).
fn skip_string(s: &[char], i: usize) -> Result<usize, String> {
    let q = s[i];
    let mut j = i + 1;
    while j < s.len() {
        if s[j] == '\\' && q != '`' {
            j += 2;
            continue;
        }
        if s[j] == q {
            return Ok(j + 1);
        }
        j += 1;
    }
    Err(format!("unterminated string starting at {i}"))
}

/// The end (exclusive) of the bracketed group starting at `i`, strings inside skipped.
fn skip_group(s: &[char], i: usize, open: char, close: char) -> Result<usize, String> {
    let mut depth = 0;
    let mut j = i;
    while j < s.len() {
        match s[j] {
            '"' | '\'' | '`' => {
                j = skip_string(s, j)?;
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return Ok(j + 1);
                }
            }
            _ => {}
        }
        j += 1;
    }
    Err(format!("unbalanced {open} at {i}"))
}

fn skip_ws(s: &[char], mut i: usize) -> usize {
    while i < s.len() && s[i].is_whitespace() {
        i += 1;
    }
    i
}

/// The label matchers between braces (without them): `a="x", b=~"y"`.
fn parse_matchers(body: &str) -> Result<Vec<Matcher>, String> {
    let s: Vec<char> = body.chars().collect();
    let mut out = Vec::new();
    let mut i = skip_ws(&s, 0);
    while i < s.len() {
        let start = i;
        while i < s.len() && is_ident(s[i]) {
            i += 1;
        }
        let label: String = s[start..i].iter().collect();
        if label.is_empty() {
            return Err(format!("expected a label name in {{{body}}}"));
        }
        i = skip_ws(&s, i);
        let op_start = i;
        while i < s.len() && "=!~".contains(s[i]) {
            i += 1;
        }
        let op: String = s[op_start..i].iter().collect();
        if !["=", "!=", "=~", "!~"].contains(&op.as_str()) {
            return Err(format!("bad matcher operator {op:?} in {{{body}}}"));
        }
        i = skip_ws(&s, i);
        if i >= s.len() || !"\"'`".contains(s[i]) {
            return Err(format!(
                "expected a quoted value after {label}{op} in {{{body}}}"
            ));
        }
        let end = skip_string(&s, i)?;
        let value: String = s[i + 1..end - 1].iter().collect();
        out.push(Matcher { label, op, value });
        i = skip_ws(&s, end);
        if i < s.len() {
            if s[i] != ',' {
                return Err(format!("expected ',' between matchers in {{{body}}}"));
            }
            i = skip_ws(&s, i + 1);
        }
    }
    Ok(out)
}

/// Every metric selector of a PromQL expression, in order. Words that are functions,
/// aggregation operators or keywords, label names in `by (...)`/`on (...)` lists and in
/// matchers, strings, numbers, durations and ranges (`[5m]`, `[$__rate_interval]`) are not
/// metrics; every other identifier is. Errors: a function PromQL does not have, a selector
/// without a metric name (`{__name__=...}`), unbalanced brackets, a `$` outside strings and
/// ranges.
pub fn selectors(expr: &str) -> Result<Vec<Selector>, String> {
    let s: Vec<char> = expr.chars().collect();
    let mut out: Vec<Selector> = Vec::new();
    // Whether the last thing read was a metric name that braces may still follow.
    let mut open_metric = false;
    let mut depth = 0usize;
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c == '#' {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&s, i)?;
            open_metric = false;
            continue;
        }
        if c == '{' {
            let end = skip_group(&s, i, '{', '}')?;
            if !open_metric {
                return Err(format!(
                    "a selector without a metric name at {i}: name the metric before the braces"
                ));
            }
            let body: String = s[i + 1..end - 1].iter().collect();
            let matchers = parse_matchers(&body)?;
            if matchers.iter().any(|m| m.label == "__name__") {
                return Err("__name__ matchers hide the metric's name: name it".into());
            }
            if let Some(last) = out.last_mut() {
                last.matchers = matchers;
            }
            open_metric = false;
            i = end;
            continue;
        }
        open_metric = false;
        if c == '[' {
            i = skip_group(&s, i, '[', ']')?;
            continue;
        }
        if c == '(' {
            depth += 1;
        }
        if c == ')' {
            depth = depth
                .checked_sub(1)
                .ok_or_else(|| format!("unbalanced ')' at {i}"))?;
        }
        if c == '$' {
            return Err(format!(
                "a variable outside a string or a range at {i}: {}",
                s[i..].iter().take(20).collect::<String>()
            ));
        }
        if c.is_ascii_digit() || (c == '.' && s.get(i + 1).is_some_and(char::is_ascii_digit)) {
            // Numbers (1, 0.9, 1e3, 0x1f) and durations (5m, 1h30m).
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '.' || s[i] == '_') {
                if (s[i] == 'e' || s[i] == 'E') && s.get(i + 1).is_some_and(|n| "+-".contains(*n)) {
                    i += 1;
                }
                i += 1;
            }
            continue;
        }
        if is_ident_start(c) {
            let start = i;
            while i < s.len() && is_ident(s[i]) {
                i += 1;
            }
            let word: String = s[start..i].iter().collect();
            let lower = word.to_ascii_lowercase();
            let next = skip_ws(&s, i);
            let paren = s.get(next) == Some(&'(');
            if LABEL_LISTS.contains(&lower.as_str()) {
                if paren {
                    i = skip_group(&s, next, '(', ')')?;
                }
                continue;
            }
            if KEYWORDS.contains(&lower.as_str()) {
                continue;
            }
            if paren {
                if !FUNCTIONS.contains(&word.as_str()) && !AGGREGATIONS.contains(&word.as_str()) {
                    return Err(format!("{word}() is not a PromQL function"));
                }
                continue;
            }
            if AGGREGATIONS.contains(&word.as_str()) {
                // `sum by (x) (...)`: the clause comes between the operator and its argument.
                continue;
            }
            out.push(Selector {
                metric: word,
                matchers: Vec::new(),
            });
            open_metric = true;
            continue;
        }
        i += 1;
    }
    if depth != 0 {
        return Err("unbalanced '('".into());
    }
    Ok(out)
}

/// The metric names of an expression.
pub fn metric_names(expr: &str) -> Result<BTreeSet<String>, String> {
    Ok(selectors(expr)?.into_iter().map(|s| s.metric).collect())
}

/// `label_values(SELECTOR, LABEL)` of a query variable, as (selector, label); `None` for
/// other variable queries.
pub fn label_values_query(q: &str) -> Option<(String, String)> {
    let inner = q.trim().strip_prefix("label_values(")?.strip_suffix(')')?;
    let (sel, label) = inner.rsplit_once(',')?;
    Some((sel.trim().to_string(), label.trim().to_string()))
}

/// Replaces `$name` and `${name}` by `values[name]`; a variable without a value is an error.
pub fn substitute(expr: &str, values: &BTreeMap<&str, String>) -> Result<String, String> {
    let s: Vec<char> = expr.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < s.len() {
        if s[i] != '$' {
            out.push(s[i]);
            i += 1;
            continue;
        }
        let (name, end) = if s.get(i + 1) == Some(&'{') {
            let close = s[i..]
                .iter()
                .position(|c| *c == '}')
                .ok_or_else(|| format!("unclosed ${{ in {expr}"))?;
            (
                s[i + 2..i + close].iter().collect::<String>(),
                i + close + 1,
            )
        } else {
            let mut j = i + 1;
            while j < s.len() && (s[j].is_ascii_alphanumeric() || s[j] == '_') {
                j += 1;
            }
            (s[i + 1..j].iter().collect::<String>(), j)
        };
        let v = values
            .get(name.as_str())
            .ok_or_else(|| format!("no value for ${name} in {expr}"))?;
        out.push_str(v);
        i = end;
    }
    Ok(out)
}

/// The labels a legend format names (`{{namespace}}/{{pod}}`).
pub fn legend_labels(legend: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = legend;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        out.push(after[..end].trim().to_string());
        rest = &after[end + 2..];
    }
    out
}

/// Which metric names a dashboard may use, and which labels each has.
pub struct Allowed {
    /// name -> labels; histograms under their `_bucket`, `_sum` and `_count` series too
    /// (`_bucket` with `le`).
    pub metrics: BTreeMap<String, Vec<String>>,
}

impl Allowed {
    /// From a catalogue of (name, kind, labels); `kind` as Prometheus writes it.
    pub fn new<'a>(
        catalogue: impl IntoIterator<Item = (&'a str, &'a str, &'a [&'a str])>,
    ) -> Allowed {
        let mut metrics = BTreeMap::new();
        for (name, kind, labels) in catalogue {
            let labels: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
            if kind == "histogram" {
                let mut with_le = labels.clone();
                with_le.push("le".into());
                metrics.insert(format!("{name}_bucket"), with_le);
                metrics.insert(format!("{name}_sum"), labels.clone());
                metrics.insert(format!("{name}_count"), labels);
            } else {
                metrics.insert(name.to_string(), labels);
            }
        }
        Allowed { metrics }
    }

    /// Whether a dashboard may use `name`: a catalogued metric, `up` or a `process_*` metric.
    pub fn allows(&self, name: &str) -> bool {
        self.metrics.contains_key(name) || name == "up" || name.starts_with("process_")
    }

    /// The labels of `name` (none for `up` and `process_*`, which carry only target labels).
    pub fn labels(&self, name: &str) -> &[String] {
        self.metrics.get(name).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// What is wrong with one query: a parse error, a metric outside the catalogue, a selector
/// that does not filter by `$cluster` and `$node` (and `$namespace` when the metric has that
/// label). Empty: nothing.
pub fn query_problems(expr: &str, allowed: &Allowed) -> Vec<String> {
    let sels = match selectors(expr) {
        Ok(s) => s,
        Err(e) => return vec![e],
    };
    let mut bad = Vec::new();
    if sels.is_empty() {
        bad.push("no metric in the query".to_string());
    }
    for sel in sels {
        if !allowed.allows(&sel.metric) {
            bad.push(format!(
                "{} is not in ragent's metric catalogue (agent/src/metrics.rs), nor up or process_*",
                sel.metric
            ));
            continue;
        }
        let mut want = vec!["cluster", "node"];
        if allowed.labels(&sel.metric).iter().any(|l| l == "namespace") {
            want.push("namespace");
        }
        for label in want {
            let ok = sel
                .matchers
                .iter()
                .any(|m| m.label == label && m.op == "=~" && m.value == format!("${label}"));
            if !ok {
                bad.push(format!(
                    "{} does not filter by {label}=~\"${label}\"",
                    sel.metric
                ));
            }
        }
        for m in &sel.matchers {
            let known = ["cluster", "node"].contains(&m.label.as_str())
                || allowed.labels(&sel.metric).contains(&m.label);
            if !known {
                bad.push(format!("{} has no label {}", sel.metric, m.label));
            }
        }
    }
    bad
}

/// The metric table of the README's "Metric catalogue": (name, type).
pub fn readme_catalogue(readme: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in readme.lines() {
        if line.starts_with("## ") {
            inside = line.trim() == "## Metric catalogue";
            continue;
        }
        if !inside {
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "", "`name`", "type", "labels", "meaning", ""
        if cells.len() >= 4 && cells[1].starts_with('`') && cells[1].ends_with('`') {
            out.push((cells[1].trim_matches('`').to_string(), cells[2].to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(expr: &str) -> Vec<String> {
        metric_names(expr).unwrap().into_iter().collect()
    }

    #[test]
    fn finds_metric_names_and_skips_everything_else() {
        assert_eq!(names("up"), ["up"]);
        assert_eq!(
            names(
                "topk(10, sum by (namespace, pod) (rate(ragent_pod_network_bytes_total{node=~\"$node\", direction=\"ingress\"}[$__rate_interval])))"
            ),
            ["ragent_pod_network_bytes_total"]
        );
        assert_eq!(
            names(
                "histogram_quantile(0.9, sum by (le) (increase(a_bucket{x=\"rate(b)\"}[1h] offset 5m)))"
            ),
            ["a_bucket"]
        );
        assert_eq!(
            names("sum without (instance) (a) / on (node) group_left (version) b"),
            ["a", "b"]
        );
        assert_eq!(
            names(
                "label_replace(sum(c) == 0, \"reason\", \"none\", \"\", \"\") or sum(d) > bool 1e3"
            ),
            ["c", "d"]
        );
        assert_eq!(names("sum(e)by(node) and f unless g"), ["e", "f", "g"]);
        assert_eq!(names("max_over_time(h[1h:5m]) # h is a gauge"), ["h"]);
        assert_eq!(names("sum(rate(j:k_total[5m]))"), ["j:k_total"]);
        // Label names inside matchers and grouping lists are not metrics.
        let s = selectors("m{a=\"1\", b!~'x|y'} + sum by (pod) (n)").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            s[0].matchers,
            vec![
                Matcher {
                    label: "a".into(),
                    op: "=".into(),
                    value: "1".into()
                },
                Matcher {
                    label: "b".into(),
                    op: "!~".into(),
                    value: "x|y".into()
                }
            ]
        );
    }

    #[test]
    fn refuses_what_it_cannot_vouch_for() {
        assert!(
            selectors("rated(x)")
                .unwrap_err()
                .contains("not a PromQL function")
        );
        assert!(selectors("{__name__=\"x\"}").is_err());
        assert!(selectors("x{__name__=\"y\"}").is_err());
        assert!(selectors("sum(x").is_err());
        assert!(selectors("sum(x))").is_err());
        assert!(selectors("x{a=\"b}").is_err());
        assert!(selectors("x > $threshold").is_err());
    }

    #[test]
    fn substitutes_variables_in_both_spellings() {
        let v = BTreeMap::from([("node", "a|b".to_string()), ("__range", "1h".to_string())]);
        assert_eq!(
            substitute("x{node=~\"$node\"}[$__range] ${node}", &v).unwrap(),
            "x{node=~\"a|b\"}[1h] a|b"
        );
        assert!(substitute("x{pod=~\"$pod\"}", &v).is_err());
        assert_eq!(
            label_values_query("label_values(m{a=~\"$a\"}, node)"),
            Some(("m{a=~\"$a\"}".into(), "node".into()))
        );
        assert_eq!(
            legend_labels("{{namespace}}/{{ pod }} in"),
            ["namespace", "pod"]
        );
    }

    #[test]
    fn a_selector_must_filter_by_the_dashboard_variables() {
        let allowed = Allowed::new([
            ("ragent_a", "gauge", &[][..]),
            ("ragent_p", "counter", &["namespace", "pod"][..]),
            ("ragent_h", "histogram", &[][..]),
        ]);
        let all = "{cluster=~\"$cluster\", node=~\"$node\"}";
        assert!(query_problems(&format!("ragent_a{all}"), &allowed).is_empty());
        assert!(
            query_problems(
                &format!("histogram_quantile(0.5, rate(ragent_h_bucket{all}[5m]))"),
                &allowed
            )
            .is_empty()
        );
        let p = query_problems("ragent_a{node=~\"$node\"}", &allowed);
        assert_eq!(p, ["ragent_a does not filter by cluster=~\"$cluster\""]);
        let p = query_problems(&format!("ragent_p{all}"), &allowed);
        assert_eq!(p, ["ragent_p does not filter by namespace=~\"$namespace\""]);
        let p = query_problems(&format!("ragent_b{all}"), &allowed);
        assert!(p[0].contains("not in ragent's metric catalogue"), "{p:?}");
        let p = query_problems(
            "ragent_a{cluster=~\"$cluster\", node=~\"$node\", pod=\"x\"}",
            &allowed,
        );
        assert_eq!(p, ["ragent_a has no label pod"]);
    }

    fn shipped() -> Vec<Dashboard> {
        Dashboard::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards"))
            .expect("dashboards/")
    }

    fn catalogue() -> Allowed {
        Allowed::new(
            ragent::metrics::CATALOGUE
                .iter()
                .map(|d| (d.name, d.kind.as_str(), d.labels)),
        )
    }

    /// The JSON model of every dashboard: uids, titles, panels, targets, datasources.
    #[test]
    fn shipped_dashboards_are_well_formed() {
        let ds = shipped();
        assert!(
            ds.len() >= 4,
            "expected the four dashboards, found {}",
            ds.len()
        );
        let mut uids = BTreeSet::new();
        let mut problems = Vec::new();
        for d in &ds {
            problems.extend(d.shape_problems());
            if !uids.insert(d.uid().to_string()) {
                problems.push(format!("{}: uid {} is used twice", d.file(), d.uid()));
            }
            if d.queries().is_empty() {
                problems.push(format!("{}: no queries", d.file()));
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    /// Every query uses only catalogued metrics and filters by the dashboard's variables;
    /// every variable those filters use is defined, with an All value that matches series
    /// without the label (a Prometheus without a `cluster` label still shows data).
    #[test]
    fn shipped_dashboards_use_only_catalogued_metrics_filtered_by_their_variables() {
        let allowed = catalogue();
        let mut problems = Vec::new();
        let mut used = BTreeSet::new();
        for d in shipped() {
            let vars: BTreeMap<String, Variable> = d
                .variables()
                .into_iter()
                .map(|v| (v.name.clone(), v))
                .collect();
            let json_vars = d.json["templating"]["list"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for v in &json_vars {
                let name = v["name"].as_str().unwrap_or("");
                if v["type"] == "query" {
                    let ok = v["includeAll"] == true
                        && v["multi"] == true
                        && v["allValue"] == ".*"
                        && v["datasource"]["uid"] == DATASOURCE_UID;
                    if !ok {
                        problems.push(format!(
                            "{}: variable {name} must be multi, include All with allValue \".*\" and use {DATASOURCE_UID}",
                            d.file()
                        ));
                    }
                }
            }
            match vars.get("datasource") {
                Some(v) if v.kind == "datasource" => {}
                _ => problems.push(format!("{}: no datasource variable", d.file())),
            }
            let mut needed: BTreeSet<&str> = BTreeSet::from(["cluster", "node"]);
            for q in d.queries() {
                for p in query_problems(&q.expr, &allowed) {
                    problems.push(format!(
                        "{} panel {:?} ({}): {p}: {}",
                        d.file(),
                        q.panel,
                        q.ref_id,
                        q.expr
                    ));
                }
                if q.expr.contains("$namespace") {
                    needed.insert("namespace");
                }
                used.extend(metric_names(&q.expr).unwrap_or_default());
            }
            for name in needed {
                let Some(v) = vars.get(name) else {
                    problems.push(format!("{}: no {name} variable", d.file()));
                    continue;
                };
                let q = v.query.clone().unwrap_or_default();
                let Some((sel, label)) = label_values_query(&q) else {
                    problems.push(format!(
                        "{}: variable {name} is not a label_values() query: {q}",
                        d.file()
                    ));
                    continue;
                };
                if label != name {
                    problems.push(format!("{}: variable {name} lists {label}", d.file()));
                }
                match metric_names(&sel) {
                    Ok(m) if m.iter().all(|m| allowed.allows(m)) && m.len() == 1 => {}
                    other => problems.push(format!(
                        "{}: variable {name}'s selector {sel}: {other:?}",
                        d.file()
                    )),
                }
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
        // The rebase metrics of issue 5 are on a dashboard.
        for m in [
            "ragent_rebases_total",
            "ragent_images_by_run_image",
            "ragent_run_image_oldest_unpatched_age_seconds",
            "ragent_run_image_polls_total",
        ] {
            assert!(used.contains(m), "no panel shows {m}");
        }
    }

    /// `dashboards/README.md` lists every panel of every dashboard, with its type and metrics.
    #[test]
    fn the_dashboards_readme_lists_every_panel() {
        let readme = include_str!("../../dashboards/README.md");
        let mut missing = Vec::new();
        for d in shipped() {
            if !readme.contains(&format!("`{}`", d.file())) {
                missing.push(format!("the dashboard {}", d.file()));
            }
            for p in d.panels() {
                let title = p["title"].as_str().unwrap_or("");
                let kind = p["type"].as_str().unwrap_or("");
                let row = if kind == "row" {
                    format!("| **{title}** | row | |")
                } else {
                    let mut metrics = BTreeSet::new();
                    for t in p["targets"].as_array().into_iter().flatten() {
                        metrics.extend(
                            metric_names(t["expr"].as_str().unwrap_or("")).unwrap_or_default(),
                        );
                    }
                    let metrics: Vec<String> = metrics.iter().map(|m| format!("`{m}`")).collect();
                    format!("| {title} | {kind} | {} |", metrics.join(", "))
                };
                if !readme.lines().any(|l| l == row) {
                    missing.push(row);
                }
            }
        }
        assert!(
            missing.is_empty(),
            "dashboards/README.md lacks these rows:\n{}",
            missing.join("\n")
        );
    }

    /// The README's table and the catalogue name the same metrics with the same types, so
    /// "only catalogued metrics" means the same thing to a reader and to the tests.
    #[test]
    fn the_readme_table_is_the_catalogue() {
        let readme = readme_catalogue(include_str!("../../README.md"));
        let table: BTreeSet<(String, String)> = readme.into_iter().collect();
        let code: BTreeSet<(String, String)> = ragent::metrics::CATALOGUE
            .iter()
            .map(|d| (d.name.to_string(), d.kind.as_str().to_string()))
            .collect();
        assert_eq!(table, code);
    }
}
