//! Reading Prometheus / OpenMetrics text as `prometheus-client` writes it:
//! `name{label="value",…} value`, one sample per line. How a process's own
//! `/metrics` becomes stored series (the query service records its own; a
//! sidecar pushes its stats to the collector) without a scraper.

/// One sample of an exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// The samples of `text`; comments and `_created` series (OpenMetrics'
/// counter start times, not values) left out, as are lines that do not
/// parse.
pub fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let series = series.trim();
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, labels_of(rest.strip_suffix('}').unwrap_or(rest))),
            None => (series, Vec::new()),
        };
        if name.ends_with("_created") {
            continue;
        }
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

/// `{k="v",…}` in the text format, values escaped (nothing for no labels).
pub fn write_labels<K: AsRef<str>, V: AsRef<str>>(
    out: &mut String,
    labels: impl IntoIterator<Item = (K, V)>,
) {
    let mut first = true;
    for (k, v) in labels {
        out.push(if first { '{' } else { ',' });
        first = false;
        out.push_str(k.as_ref());
        out.push_str("=\"");
        for c in v.as_ref().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    if !first {
        out.push('}');
    }
}

/// `a="x",b="y \"quoted\""` as pairs, with the text format's escapes.
fn labels_of(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        let name = name.trim().trim_start_matches(',').trim().to_string();
        if name.is_empty() || chars.next() != Some('"') {
            return out;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                c => value.push(c),
            }
        }
        out.push((name, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_lines_become_samples() {
        let text = "# HELP lumen_flushes Flushes\n# TYPE lumen_flushes counter\n\
                    lumen_flushes_total 3\nlumen_flushes_created 1.7e9\n\
                    lumen_table_rows{table=\"requests\"} 120\n\
                    lumen_x{a=\"q\\\"uote\",b=\"2\"} +Inf\n# EOF\n";
        let got = parse(text);
        let names: Vec<&str> = got.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["lumen_flushes_total", "lumen_table_rows", "lumen_x"]
        );
        assert_eq!(got[0].value, 3.0);
        assert_eq!(
            got[1].labels,
            [("table".to_string(), "requests".to_string())]
        );
        assert_eq!(got[2].labels[0], ("a".into(), "q\"uote".into()));
        assert_eq!(got[2].labels[1], ("b".into(), "2".into()));
        assert!(got[2].value.is_infinite());
    }
}
