//! Reading the Prometheus text format the way a test needs it: samples by metric name and a
//! subset of labels, whatever order the exporter writes the labels in.
use std::collections::BTreeMap;

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// Whether every `(label, value)` of `want` is on this sample.
    pub fn matches(&self, want: &[(&str, &str)]) -> bool {
        want.iter()
            .all(|(k, v)| self.labels.get(*k).is_some_and(|x| x == v))
    }

    /// `name{a="1",b="2"}` (labels sorted), for messages.
    pub fn series(&self) -> String {
        let l: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        format!("{}{{{}}}", self.name, l.join(","))
    }
}

/// Every sample of `text`; comment lines and lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(i) => {
            let (labels, rest) = parse_labels(&line[i + 1..])?;
            (&line[..i], labels, rest)
        }
        None => {
            let i = line.find(' ')?;
            (&line[..i], BTreeMap::new(), &line[i..])
        }
    };
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// `a="x",b="y\"z"} rest` -> labels and `rest`.
fn parse_labels(s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_string();
        let mut chars = rest[eq + 1..].char_indices();
        if chars.next()?.1 != '"' {
            return None;
        }
        let mut value = String::new();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.insert(key, value);
        rest = &rest[eq + 1 + end + 1..];
    }
}

/// The samples of metric `name` that carry every label of `want`.
pub fn find<'a>(samples: &'a [Sample], name: &str, want: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name && s.matches(want))
        .collect()
}

/// The value of the one sample of `name` with the labels of `want`; None if there is none,
/// panics if several match (the test named too few labels).
pub fn value(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let found = find(samples, name, want);
    assert!(
        found.len() <= 1,
        "{name} {want:?} matches {} series: {:?}",
        found.len(),
        found.iter().map(|s| s.series()).collect::<Vec<_>>()
    );
    found.first().map(|s| s.value)
}

/// The sum over every sample of `name` with the labels of `want` (0 when there is none).
pub fn sum(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    find(samples, name, want).iter().map(|s| s.value).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_samples_in_any_label_order() {
        let text = "# HELP x_total help\n# TYPE x_total counter\n\
                    x_total{pod=\"a\",namespace=\"n\",direction=\"ingress\"} 1.5e3\n\
                    x_total{direction=\"egress\",namespace=\"n\",pod=\"a\"} 7\n\
                    up 1\n\
                    y{image=\"127.0.0.1:5057/r/a:v1\",q=\"say \\\"hi\\\", ok\"} +Inf\n";
        let s = parse(text);
        assert_eq!(s.len(), 4);
        assert_eq!(
            value(
                &s,
                "x_total",
                &[("namespace", "n"), ("pod", "a"), ("direction", "ingress")]
            ),
            Some(1500.0)
        );
        assert_eq!(value(&s, "x_total", &[("direction", "egress")]), Some(7.0));
        assert_eq!(sum(&s, "x_total", &[("pod", "a")]), 1507.0);
        assert_eq!(sum(&s, "x_total", &[("pod", "b")]), 0.0);
        assert_eq!(value(&s, "up", &[]), Some(1.0));
        assert_eq!(
            value(&s, "y", &[("image", "127.0.0.1:5057/r/a:v1")]),
            Some(f64::INFINITY)
        );
        assert_eq!(s[3].labels["q"], "say \"hi\", ok");
    }
}
