//! What PromQL expressions evaluate to, over the steps of a range query
//! (an instant query is a range query of one step).

/// A series' labels, sorted by name, without empty values (an empty label
/// value is the same as no label in PromQL).
pub type Labels = Vec<(String, String)>;

/// The label that holds a series' metric name.
pub const METRIC_NAME: &str = "__name__";

/// The evaluation steps, in milliseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Steps {
    pub start: i64,
    pub end: i64,
    /// At least 1.
    pub step: i64,
}

impl Steps {
    pub fn instant(t: i64) -> Self {
        Steps {
            start: t,
            end: t,
            step: 1,
        }
    }

    pub fn len(&self) -> usize {
        ((self.end - self.start) / self.step) as usize + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn time(&self, i: usize) -> i64 {
        self.start + self.step * i as i64
    }

    pub fn times(&self) -> impl Iterator<Item = i64> + '_ {
        (0..self.len()).map(|i| self.time(i))
    }
}

/// A series as an instant vector sees it: one value (or none) per step.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub labels: Labels,
    pub values: Vec<Option<f64>>,
}

/// A series' raw samples, `(milliseconds, value)`, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct RawSeries {
    pub labels: Labels,
    pub samples: Vec<(i64, f64)>,
}

/// The value of an expression over every step.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// One number per step.
    Scalar(Vec<f64>),
    Vector(Vec<Series>),
    /// Only as the answer of an instant query of a range selector or subquery.
    Matrix(Vec<RawSeries>),
    String(String),
}

impl Value {
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Scalar(_) => "scalar",
            Value::Vector(_) => "vector",
            Value::Matrix(_) => "matrix",
            Value::String(_) => "string",
        }
    }
}

pub fn get<'a>(labels: &'a Labels, name: &str) -> Option<&'a str> {
    labels
        .binary_search_by(|(n, _)| n.as_str().cmp(name))
        .ok()
        .map(|i| labels[i].1.as_str())
}

/// Sets `name` to `value`; an empty value removes the label.
pub fn set(labels: &mut Labels, name: &str, value: &str) {
    match labels.binary_search_by(|(n, _)| n.as_str().cmp(name)) {
        Ok(i) if value.is_empty() => {
            labels.remove(i);
        }
        Ok(i) => labels[i].1 = value.to_string(),
        Err(_) if value.is_empty() => {}
        Err(i) => labels.insert(i, (name.to_string(), value.to_string())),
    }
}

pub fn remove(labels: &mut Labels, name: &str) {
    if let Ok(i) = labels.binary_search_by(|(n, _)| n.as_str().cmp(name)) {
        labels.remove(i);
    }
}

/// Sorts and drops empty values: the canonical form of a label set.
pub fn normalize(mut labels: Labels) -> Labels {
    labels.retain(|(_, v)| !v.is_empty());
    labels.sort();
    labels.dedup_by(|a, b| a.0 == b.0);
    labels
}

/// `{a="x", b="y"}`, as Prometheus prints a label set in errors.
pub fn display(labels: &Labels) -> String {
    let inner: Vec<String> = labels.iter().map(|(n, v)| format!("{n}={v:?}")).collect();
    format!("{{{}}}", inner.join(", "))
}

/// A number as Prometheus's JSON writes it.
pub fn format_number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

/// Milliseconds as Prometheus's JSON writes a timestamp: seconds, as a number.
pub fn format_time(ms: i64) -> serde_json::Value {
    if ms % 1000 == 0 {
        serde_json::Value::from(ms / 1000)
    } else {
        serde_json::Number::from_f64(ms as f64 / 1000.0)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null)
    }
}
