//! PromQL's functions and aggregation operators, with Prometheus's
//! definitions (extrapolation of `rate`, interpolation of `quantile` and
//! `histogram_quantile`, which results keep the metric name).

use std::collections::HashMap;

use chrono::{Datelike, Timelike};
use promql_parser::label::MatchOp;
use promql_parser::parser::{Call, Expr, LabelModifier};

use super::PromError;
use super::eval::{Evaluator, RangeArg, window};
use super::value::{self, Labels, METRIC_NAME, Series, Steps, Value};

pub async fn call(ev: &Evaluator<'_>, call: &Call, steps: Steps) -> Result<Value, PromError> {
    let name = call.func.name;
    let args = &call.args.args;
    let n = steps.len();
    let arg = |i: usize| -> Result<&Expr, PromError> {
        args.get(i)
            .map(|a| a.as_ref())
            .ok_or_else(|| PromError::BadData(format!("{name}() is missing argument {}", i + 1)))
    };
    if name == "double_exponential_smoothing" {
        let range = ev.range_arg(arg(0)?, steps).await?;
        let sf = scalar(ev, arg(1)?, steps, name).await?;
        let tf = scalar(ev, arg(2)?, steps, name).await?;
        for (what, v) in [("smoothing", &sf), ("trend", &tf)] {
            if let Some(bad) = v.iter().find(|x| !(**x > 0.0 && **x < 1.0)) {
                return Err(PromError::Execution(format!(
                    "invalid {what} factor. Expected: 0 < {} < 1, got: {bad}",
                    if what == "smoothing" { "sf" } else { "tf" }
                )));
            }
        }
        let out = range
            .series
            .iter()
            .filter_map(|s| {
                let values: Vec<Option<f64>> = range
                    .windows
                    .iter()
                    .enumerate()
                    .map(|(i, &(a, b))| smooth(window(&s.samples, a, b), sf[i], tf[i]))
                    .collect();
                let mut labels = s.labels.clone();
                value::remove(&mut labels, METRIC_NAME);
                values
                    .iter()
                    .any(Option::is_some)
                    .then_some(Series { labels, values })
            })
            .collect();
        return Ok(Value::Vector(out));
    }
    if let Some(f) = range_function(name) {
        // Functions whose first argument is a parameter, then the range.
        let (param, range_expr) = match name {
            "quantile_over_time" => (Some(scalar(ev, arg(0)?, steps, name).await?), arg(1)?),
            "predict_linear" => (Some(scalar(ev, arg(1)?, steps, name).await?), arg(0)?),
            _ => (None, arg(0)?),
        };
        let range = ev.range_arg(range_expr, steps).await?;
        if name == "absent_over_time" {
            let any = |i: usize| {
                range.series.iter().any(|s| {
                    let (a, b) = range.windows[i];
                    !window(&s.samples, a, b).is_empty()
                })
            };
            return Ok(absent_result(range_expr, (0..n).map(|i| !any(i)).collect()));
        }
        return Ok(Value::Vector(apply_range(
            name,
            f,
            &range,
            param.as_deref(),
            steps,
        )));
    }
    match name {
        "time" => Ok(Value::Scalar(
            steps.times().map(|t| t as f64 / 1000.0).collect(),
        )),
        "pi" => Ok(Value::Scalar(vec![std::f64::consts::PI; n])),
        "vector" => {
            let s = scalar(ev, arg(0)?, steps, name).await?;
            Ok(Value::Vector(vec![Series {
                labels: Vec::new(),
                values: s.into_iter().map(Some).collect(),
            }]))
        }
        "scalar" => {
            let v = vector(ev, arg(0)?, steps, name).await?;
            Ok(Value::Scalar(
                (0..n)
                    .map(|i| {
                        let mut present = v.iter().filter_map(|s| s.values[i]);
                        match (present.next(), present.next()) {
                            (Some(x), None) => x,
                            _ => f64::NAN,
                        }
                    })
                    .collect(),
            ))
        }
        "absent" => {
            let v = vector(ev, arg(0)?, steps, name).await?;
            let absent = (0..n)
                .map(|i| v.iter().all(|s| s.values[i].is_none()))
                .collect();
            Ok(absent_result(arg(0)?, absent))
        }
        "histogram_fraction" => {
            let lower = scalar(ev, arg(0)?, steps, name).await?;
            let upper = scalar(ev, arg(1)?, steps, name).await?;
            let v = vector(ev, arg(2)?, steps, name).await?;
            Ok(Value::Vector(per_histogram(v, n, |i, b| {
                bucket_fraction(lower[i], upper[i], b)
            })))
        }
        "histogram_quantile" => {
            let q = scalar(ev, arg(0)?, steps, name).await?;
            let v = vector(ev, arg(1)?, steps, name).await?;
            Ok(Value::Vector(histogram_quantile(&q, v, n)))
        }
        "label_replace" => {
            let v = vector(ev, arg(0)?, steps, name).await?;
            let dst = string(arg(1)?, name)?;
            let replacement = string(arg(2)?, name)?;
            let src = string(arg(3)?, name)?;
            let regex = string(arg(4)?, name)?;
            let re = regex::Regex::new(&format!("^(?:{regex})$")).map_err(|e| {
                PromError::BadData(format!(
                    "invalid regular expression in label_replace(): {e}"
                ))
            })?;
            if !valid_label_name(dst) {
                return Err(PromError::BadData(format!(
                    "invalid destination label name in label_replace(): {dst}"
                )));
            }
            let out = v
                .into_iter()
                .map(|mut s| {
                    let source = value::get(&s.labels, src).unwrap_or("").to_string();
                    if let Some(caps) = re.captures(&source) {
                        let mut to = String::new();
                        caps.expand(replacement, &mut to);
                        value::set(&mut s.labels, dst, &to);
                    }
                    s
                })
                .collect();
            Ok(Value::Vector(merge_same_labels(out)?))
        }
        "label_join" => {
            let v = vector(ev, arg(0)?, steps, name).await?;
            let dst = string(arg(1)?, name)?;
            let sep = string(arg(2)?, name)?;
            let srcs = args[3..]
                .iter()
                .map(|a| string(a, name))
                .collect::<Result<Vec<_>, _>>()?;
            let out = v
                .into_iter()
                .map(|mut s| {
                    let joined: Vec<&str> = srcs
                        .iter()
                        .map(|l| value::get(&s.labels, l).unwrap_or(""))
                        .collect();
                    let joined = joined.join(sep);
                    value::set(&mut s.labels, dst, &joined);
                    s
                })
                .collect();
            Ok(Value::Vector(merge_same_labels(out)?))
        }
        "sort_by_label" | "sort_by_label_desc" => {
            let mut v = vector(ev, arg(0)?, steps, name).await?;
            let by: Vec<String> = args
                .iter()
                .skip(1)
                .map(|a| string(a, name).map(str::to_string))
                .collect::<Result<_, _>>()?;
            v.sort_by(|a, b| {
                let ord = by
                    .iter()
                    .map(|l| {
                        natural_cmp(
                            value::get(&a.labels, l).unwrap_or(""),
                            value::get(&b.labels, l).unwrap_or(""),
                        )
                    })
                    .find(|o| o.is_ne())
                    .unwrap_or_else(|| a.labels.cmp(&b.labels));
                if name == "sort_by_label" {
                    ord
                } else {
                    ord.reverse()
                }
            });
            Ok(Value::Vector(v))
        }
        "sort" | "sort_desc" => {
            let mut v = vector(ev, arg(0)?, steps, name).await?;
            let key = |s: &Series| s.values.first().copied().flatten().unwrap_or(f64::NAN);
            // NaN last either way, as Prometheus sorts.
            v.sort_by(|a, b| {
                let (x, y) = (key(a), key(b));
                match (x.is_nan(), y.is_nan()) {
                    (true, true) => std::cmp::Ordering::Equal,
                    (true, false) => std::cmp::Ordering::Greater,
                    (false, true) => std::cmp::Ordering::Less,
                    _ if name == "sort" => x.total_cmp(&y),
                    _ => y.total_cmp(&x),
                }
            });
            Ok(Value::Vector(v))
        }
        "clamp" | "clamp_min" | "clamp_max" | "round" => {
            let v = vector(ev, arg(0)?, steps, name).await?;
            let p1 = match args.get(1) {
                Some(a) => scalar(ev, a, steps, name).await?,
                None => vec![1.0; n],
            };
            let p2 = match args.get(2) {
                Some(a) => scalar(ev, a, steps, name).await?,
                None => vec![f64::NAN; n],
            };
            Ok(Value::Vector(map_values(v, |i, x| match name {
                // NaN passes through, as Go's math.Max / math.Min keep it.
                _ if x.is_nan() => Some(f64::NAN),
                "clamp" if p1[i] > p2[i] => None,
                "clamp" if p1[i].is_nan() || p2[i].is_nan() => Some(f64::NAN),
                "clamp" => Some(x.max(p1[i]).min(p2[i])),
                "clamp_min" if p1[i].is_nan() => Some(f64::NAN),
                "clamp_min" => Some(x.max(p1[i])),
                "clamp_max" if p1[i].is_nan() => Some(f64::NAN),
                "clamp_max" => Some(x.min(p1[i])),
                _ => {
                    // round(v, to_nearest): Prometheus rounds half up.
                    let inv = 1.0 / p1[i];
                    Some((x * inv + 0.5).floor() / inv)
                }
            })))
        }
        "timestamp" => {
            // Of a selector: each sample's own time; of anything else, the
            // time of the step that computed it.
            let mut a = arg(0)?;
            while let Expr::Paren(p) = a {
                a = &p.expr;
            }
            let v = match a {
                Expr::VectorSelector(vs) => ev.selected(vs, steps, true).await?,
                other => {
                    let v = vector(ev, other, steps, name).await?;
                    map_values(v, |i, _| Some(steps.time(i) as f64 / 1000.0))
                }
            };
            Ok(Value::Vector(
                v.into_iter()
                    .map(|mut s| {
                        value::remove(&mut s.labels, METRIC_NAME);
                        s
                    })
                    .collect(),
            ))
        }
        "day_of_month" | "day_of_week" | "day_of_year" | "days_in_month" | "hour" | "minute"
        | "month" | "year" => {
            let v = match args.first() {
                Some(a) => vector(ev, a, steps, name).await?,
                None => vec![Series {
                    labels: Vec::new(),
                    values: steps.times().map(|t| Some(t as f64 / 1000.0)).collect(),
                }],
            };
            Ok(Value::Vector(map_values(v, |_, x| date_part(name, x))))
        }
        _ => {
            let Some(f) = math_function(name) else {
                return Err(PromError::BadData(format!(
                    "function {name}() is not supported by Lumen yet"
                )));
            };
            let v = vector(ev, arg(0)?, steps, name).await?;
            Ok(Value::Vector(map_values(v, |_, x| Some(f(x)))))
        }
    }
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

async fn scalar(
    ev: &Evaluator<'_>,
    e: &Expr,
    steps: Steps,
    f: &str,
) -> Result<Vec<f64>, PromError> {
    match ev.eval(e, steps).await? {
        Value::Scalar(v) => Ok(v),
        other => Err(PromError::BadData(format!(
            "{f}() expects a scalar argument, got a {}",
            other.kind()
        ))),
    }
}

async fn vector(
    ev: &Evaluator<'_>,
    e: &Expr,
    steps: Steps,
    f: &str,
) -> Result<Vec<Series>, PromError> {
    match ev.eval(e, steps).await? {
        Value::Vector(v) => Ok(v),
        other => Err(PromError::BadData(format!(
            "{f}() expects an instant vector argument, got a {}",
            other.kind()
        ))),
    }
}

fn string<'e>(e: &'e Expr, f: &str) -> Result<&'e str, PromError> {
    match e {
        Expr::StringLiteral(s) => Ok(&s.val),
        Expr::Paren(p) => string(&p.expr, f),
        _ => Err(PromError::BadData(format!(
            "{f}() expects a string argument"
        ))),
    }
}

/// Applies `f` to every value; drops the metric name, as Prometheus's
/// functions do.
fn map_values(series: Vec<Series>, f: impl Fn(usize, f64) -> Option<f64>) -> Vec<Series> {
    series
        .into_iter()
        .filter_map(|mut s| {
            value::remove(&mut s.labels, METRIC_NAME);
            for (i, v) in s.values.iter_mut().enumerate() {
                *v = v.and_then(|x| f(i, x));
            }
            s.values.iter().any(Option::is_some).then_some(s)
        })
        .collect()
}

/// Series whose labels became equal are one series; two values at one
/// step are an error, as in Prometheus.
fn merge_same_labels(series: Vec<Series>) -> Result<Vec<Series>, PromError> {
    let mut out: Vec<Series> = Vec::with_capacity(series.len());
    let mut index: HashMap<Labels, usize> = HashMap::new();
    for s in series {
        match index.get(&s.labels) {
            Some(&i) => {
                for (a, b) in out[i].values.iter_mut().zip(&s.values) {
                    if b.is_some() {
                        if a.is_some() {
                            return Err(PromError::Execution(
                                "vector cannot contain metrics with the same labelset".into(),
                            ));
                        }
                        *a = *b;
                    }
                }
            }
            None => {
                index.insert(s.labels.clone(), out.len());
                out.push(s);
            }
        }
    }
    Ok(out)
}

/// What `absent()` returns: 1 where nothing was present, labelled with the
/// selector's equality matchers.
/// Double exponential smoothing (Holt's linear method) of a window's
/// values, as Prometheus computes it; `None` for fewer than two samples.
fn smooth(s: &[(i64, f64)], sf: f64, tf: f64) -> Option<f64> {
    if s.len() < 2 {
        return None;
    }
    let (mut s0, mut s1) = (0.0, s[0].1);
    let mut b = s[1].1 - s[0].1;
    for (i, &(_, v)) in s.iter().enumerate().skip(1) {
        let x = sf * v;
        // The trend: the first step keeps the initial slope.
        if i > 1 {
            b = tf * (s1 - s0) + (1.0 - tf) * b;
        }
        let y = (1.0 - sf) * (s1 + b);
        (s0, s1) = (s1, x + y);
    }
    Some(s1)
}

/// Natural order: runs of digits compare as numbers (`a2 < a10`).
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (mut x, mut y) = (a, b);
    loop {
        match (x.chars().next(), y.chars().next()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, _) => return std::cmp::Ordering::Less,
            (_, None) => return std::cmp::Ordering::Greater,
            (Some(c), Some(d)) if c.is_ascii_digit() && d.is_ascii_digit() => {
                let xe = x.find(|c: char| !c.is_ascii_digit()).unwrap_or(x.len());
                let ye = y.find(|c: char| !c.is_ascii_digit()).unwrap_or(y.len());
                let (xn, yn) = (
                    x[..xe].trim_start_matches('0'),
                    y[..ye].trim_start_matches('0'),
                );
                let o = xn.len().cmp(&yn.len()).then_with(|| xn.cmp(yn));
                if o.is_ne() {
                    return o;
                }
                (x, y) = (&x[xe..], &y[ye..]);
            }
            (Some(c), Some(d)) => {
                if c != d {
                    return c.cmp(&d);
                }
                (x, y) = (&x[c.len_utf8()..], &y[d.len_utf8()..]);
            }
        }
    }
}

/// Prometheus's rule for a function's answer: two series with the same
/// labels at one step (names dropped from both) are an error.
pub fn unique_labelsets(v: &[Series]) -> Result<(), PromError> {
    let mut seen: HashMap<&Labels, usize> = HashMap::new();
    for (i, s) in v.iter().enumerate() {
        if let Some(&j) = seen.get(&s.labels)
            && v[j]
                .values
                .iter()
                .zip(&s.values)
                .any(|(a, b)| a.is_some() && b.is_some())
        {
            return Err(PromError::Execution(
                "vector cannot contain metrics with the same labelset".into(),
            ));
        }
        seen.insert(&s.labels, i);
    }
    Ok(())
}

fn absent_result(arg: &Expr, absent: Vec<bool>) -> Value {
    let mut labels: Labels = Vec::new();
    let selector = match arg {
        Expr::VectorSelector(vs) => Some(vs),
        Expr::MatrixSelector(ms) => Some(&ms.vs),
        _ => None,
    };
    if let Some(vs) = selector {
        // A label with one equality matcher is kept; a second matcher of
        // any kind on it drops it, as in Prometheus.
        let mut seen: Vec<&str> = Vec::new();
        for m in &vs.matchers.matchers {
            if m.name == METRIC_NAME {
                continue;
            }
            if matches!(m.op, MatchOp::Equal) && !seen.contains(&m.name.as_str()) {
                value::set(&mut labels, &m.name, &m.value);
            } else {
                value::remove(&mut labels, &m.name);
            }
            seen.push(&m.name);
        }
    }
    if !absent.iter().any(|a| *a) {
        return Value::Vector(Vec::new());
    }
    Value::Vector(vec![Series {
        labels,
        values: absent.into_iter().map(|a| a.then_some(1.0)).collect(),
    }])
}

type RangeFn = fn(&[(i64, f64)], i64, i64, f64) -> Option<f64>;

fn range_function(name: &str) -> Option<RangeFn> {
    Some(match name {
        "rate" => |s, a, b, _| extrapolated(s, a, b, true, true),
        "increase" => |s, a, b, _| extrapolated(s, a, b, true, false),
        "delta" => |s, a, b, _| extrapolated(s, a, b, false, false),
        "irate" => |s, _, _, _| instant_delta(s, true),
        "idelta" => |s, _, _, _| instant_delta(s, false),
        "avg_over_time" => {
            |s, _, _, _| (!s.is_empty()).then(|| mean(&s.iter().map(|p| p.1).collect::<Vec<_>>()))
        }
        "sum_over_time" => |s, _, _, _| (!s.is_empty()).then(|| sum(s)),
        "count_over_time" => |s, _, _, _| (!s.is_empty()).then_some(s.len() as f64),
        "min_over_time" => |s, _, _, _| s.iter().map(|p| p.1).reduce(nan_min),
        "max_over_time" => |s, _, _, _| s.iter().map(|p| p.1).reduce(nan_max),
        "last_over_time" => |s, _, _, _| s.last().map(|p| p.1),
        "ts_of_last_over_time" => |s, _, _, _| s.last().map(|p| p.0 as f64 / 1000.0),
        // The latest of equal extremes, as Prometheus picks.
        "ts_of_min_over_time" => |s, _, _, _| {
            s.iter()
                .fold(None::<(i64, f64)>, |best, &p| match best {
                    Some(b) if !(p.1 <= b.1 || b.1.is_nan()) => Some(b),
                    _ => Some(p),
                })
                .map(|p| p.0 as f64 / 1000.0)
        },
        "ts_of_max_over_time" => |s, _, _, _| {
            s.iter()
                .fold(None::<(i64, f64)>, |best, &p| match best {
                    Some(b) if !(p.1 >= b.1 || b.1.is_nan()) => Some(b),
                    _ => Some(p),
                })
                .map(|p| p.0 as f64 / 1000.0)
        },
        // Median absolute deviation.
        "mad_over_time" => |s, _, _, _| {
            (!s.is_empty()).then(|| {
                let vals: Vec<f64> = s.iter().map(|p| p.1).collect();
                let median = quantile(0.5, vals.clone());
                quantile(0.5, vals.iter().map(|v| (v - median).abs()).collect())
            })
        },
        "present_over_time" => |s, _, _, _| (!s.is_empty()).then_some(1.0),
        "stddev_over_time" => |s, _, _, _| variance(s).map(f64::sqrt),
        "stdvar_over_time" => |s, _, _, _| variance(s),
        // NaN after NaN is no change, as in Prometheus.
        "changes" => |s, _, _, _| {
            (!s.is_empty()).then(|| {
                s.windows(2)
                    .filter(|w| !(w[0].1 == w[1].1 || w[0].1.is_nan() && w[1].1.is_nan()))
                    .count() as f64
            })
        },
        "resets" => |s, _, _, _| {
            (!s.is_empty()).then(|| s.windows(2).filter(|w| w[1].1 < w[0].1).count() as f64)
        },
        "deriv" => |s, _, b, _| regression(s, b).map(|(slope, _)| slope),
        "predict_linear" => |s, _, b, t| regression(s, b).map(|(slope, icpt)| icpt + slope * t),
        "quantile_over_time" => {
            |s, _, _, q| (!s.is_empty()).then(|| quantile(q, s.iter().map(|p| p.1).collect()))
        }
        "absent_over_time" => |_, _, _, _| None,
        _ => return None,
    })
}

fn apply_range(
    name: &str,
    f: RangeFn,
    range: &RangeArg,
    param: Option<&[f64]>,
    steps: Steps,
) -> Vec<Series> {
    let keep_name = name == "last_over_time";
    range
        .series
        .iter()
        .filter_map(|s| {
            let values: Vec<Option<f64>> = range
                .windows
                .iter()
                .enumerate()
                .map(|(i, &(a, b))| {
                    let p = param.map_or(0.0, |p| p[i]);
                    // A regression is anchored at the step's own time,
                    // whatever `@` or `offset` moved the window to.
                    let at = if name == "predict_linear" {
                        steps.time(i)
                    } else {
                        b
                    };
                    f(window(&s.samples, a, b), a, at, p)
                })
                .collect();
            if values.iter().all(Option::is_none) {
                return None;
            }
            let mut labels = s.labels.clone();
            if !keep_name {
                value::remove(&mut labels, METRIC_NAME);
            }
            debug_assert_eq!(values.len(), steps.len());
            Some(Series { labels, values })
        })
        .collect()
}

fn sum(s: &[(i64, f64)]) -> f64 {
    kahan_sum(&s.iter().map(|p| p.1).collect::<Vec<_>>())
}

fn nan_min(a: f64, b: f64) -> f64 {
    if a.is_nan() || b < a { b } else { a }
}

fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b > a { b } else { a }
}

fn variance(s: &[(i64, f64)]) -> Option<f64> {
    (!s.is_empty()).then(|| welford_variance(&s.iter().map(|p| p.1).collect::<Vec<_>>()))
}

/// Least-squares slope (per second) and the value at `at`.
fn regression(s: &[(i64, f64)], at: i64) -> Option<(f64, f64)> {
    if s.len() < 2 {
        return None;
    }
    let n = s.len() as f64;
    let (mut sx, mut sy, mut sxy, mut sxx) = (0.0, 0.0, 0.0, 0.0);
    for &(t, v) in s {
        let x = (t - at) as f64 / 1000.0;
        sx += x;
        sy += v;
        sxy += x * v;
        sxx += x * x;
    }
    let cov = sxy - sx * sy / n;
    let var = sxx - sx * sx / n;
    let slope = cov / var;
    Some((slope, sy / n - slope * sx / n))
}

/// `rate`, `increase` and `delta` as Prometheus computes them: the change
/// over the samples in the window, corrected for counter resets, and
/// extrapolated to the window's edges (to half a sample interval at most
/// where the series does not reach an edge, and never below zero for a
/// counter).
fn extrapolated(s: &[(i64, f64)], start: i64, end: i64, counter: bool, rate: bool) -> Option<f64> {
    if s.len() < 2 {
        return None;
    }
    let (first, last) = (s[0], s[s.len() - 1]);
    let mut result = last.1 - first.1;
    if counter {
        for w in s.windows(2) {
            if w[1].1 < w[0].1 {
                result += w[0].1;
            }
        }
    }
    let sampled = (last.0 - first.0) as f64 / 1000.0;
    let average = sampled / (s.len() - 1) as f64;
    let threshold = average * 1.1;
    let mut to_start = (first.0 - start) as f64 / 1000.0;
    let mut to_end = (end - last.0) as f64 / 1000.0;
    if to_start >= threshold {
        to_start = average / 2.0;
    }
    if counter && result > 0.0 && first.1 >= 0.0 {
        let to_zero = sampled * (first.1 / result);
        if to_zero < to_start {
            to_start = to_zero;
        }
    }
    if to_end >= threshold {
        to_end = average / 2.0;
    }
    let factor = (sampled + to_start + to_end) / sampled;
    result *= factor;
    if rate {
        result /= (end - start) as f64 / 1000.0;
    }
    Some(result)
}

fn instant_delta(s: &[(i64, f64)], rate: bool) -> Option<f64> {
    if s.len() < 2 {
        return None;
    }
    let (prev, last) = (s[s.len() - 2], s[s.len() - 1]);
    if !rate {
        return Some(last.1 - prev.1);
    }
    let dt = (last.0 - prev.0) as f64 / 1000.0;
    if dt == 0.0 {
        return None;
    }
    let change = if last.1 < prev.1 {
        last.1
    } else {
        last.1 - prev.1
    };
    Some(change / dt)
}

/// Prometheus's `quantile`: linear interpolation between closest ranks.
fn quantile(q: f64, mut values: Vec<f64>) -> f64 {
    if values.is_empty() || q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    values.sort_by(f64::total_cmp);
    let rank = q * (values.len() - 1) as f64;
    let lower = rank.floor() as usize;
    let upper = (lower + 1).min(values.len() - 1);
    let weight = rank - rank.floor();
    values[lower] * (1.0 - weight) + values[upper] * weight
}

/// `histogram_quantile`: per group of `_bucket` series (all labels but
/// `le`), linear interpolation within the bucket the rank falls in.
fn histogram_quantile(q: &[f64], series: Vec<Series>, n: usize) -> Vec<Series> {
    per_histogram(series, n, |i, b| bucket_quantile(q[i], b))
}

/// Classic histograms: each label set's `le` buckets at each step, given
/// to `f` as `(bound, count)` pairs; the result one series per histogram.
fn per_histogram(
    series: Vec<Series>,
    n: usize,
    f: impl Fn(usize, &mut Vec<(f64, f64)>) -> f64,
) -> Vec<Series> {
    let mut groups: HashMap<Labels, Vec<(f64, &Series)>> = HashMap::new();
    let mut order: Vec<Labels> = Vec::new();
    for s in &series {
        let Some(le) = value::get(&s.labels, "le").and_then(parse_le) else {
            continue;
        };
        let mut key = s.labels.clone();
        value::remove(&mut key, "le");
        value::remove(&mut key, METRIC_NAME);
        groups
            .entry(key.clone())
            .or_insert_with(|| {
                order.push(key);
                Vec::new()
            })
            .push((le, s));
    }
    order
        .into_iter()
        .filter_map(|labels| {
            let buckets = groups.remove(&labels)?;
            let values: Vec<Option<f64>> = (0..n)
                .map(|i| {
                    let mut b: Vec<(f64, f64)> = buckets
                        .iter()
                        .filter_map(|(le, s)| s.values[i].map(|v| (*le, v)))
                        .collect();
                    (!b.is_empty()).then(|| f(i, &mut b))
                })
                .collect();
            values
                .iter()
                .any(Option::is_some)
                .then_some(Series { labels, values })
        })
        .collect()
}

/// The share of observations between `lower` and `upper`, interpolated
/// within buckets, as Prometheus's `BucketFraction`.
fn bucket_fraction(lower: f64, upper: f64, buckets: &mut Vec<(f64, f64)>) -> f64 {
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    if buckets.last().is_none_or(|b| b.0 != f64::INFINITY) {
        return f64::NAN;
    }
    buckets.dedup_by(|b, a| {
        if a.0 == b.0 {
            a.1 += b.1;
            true
        } else {
            false
        }
    });
    let count = buckets.last().map_or(0.0, |b| b.1);
    if count == 0.0 || lower.is_nan() || upper.is_nan() {
        return f64::NAN;
    }
    if lower >= upper {
        return 0.0;
    }
    let (mut rank, mut lower_rank, mut upper_rank) = (0.0, 0.0, 0.0);
    let (mut lower_set, mut upper_set) = (false, false);
    for (i, &(upper_bound, c)) in buckets.iter().enumerate() {
        let lower_bound = if i > 0 {
            buckets[i - 1].0
        } else {
            f64::NEG_INFINITY
        };
        let interpolate =
            |v: f64| rank + (c - rank) * (v - lower_bound) / (upper_bound - lower_bound);
        if !lower_set && lower_bound >= lower {
            lower_rank = rank;
            lower_set = true;
        }
        if !upper_set && lower_bound >= upper {
            upper_rank = rank;
            upper_set = true;
        }
        if lower_set && upper_set {
            break;
        }
        if !lower_set && lower_bound < lower && upper_bound > lower {
            lower_rank = interpolate(lower);
            lower_set = true;
        }
        if !upper_set && lower_bound < upper && upper_bound > upper {
            upper_rank = interpolate(upper);
            upper_set = true;
        }
        if lower_set && upper_set {
            break;
        }
        rank = c;
    }
    if !lower_set || lower_rank > count {
        lower_rank = count;
    }
    if !upper_set || upper_rank > count {
        upper_rank = count;
    }
    (upper_rank - lower_rank) / count
}

fn parse_le(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" | "+inf" | "inf" => Some(f64::INFINITY),
        _ => s.parse().ok(),
    }
}

fn bucket_quantile(q: f64, buckets: &mut Vec<(f64, f64)>) -> f64 {
    if q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Equal bounds (from differently formatted `le`s) add up.
    buckets.dedup_by(|b, a| {
        if a.0 == b.0 {
            a.1 += b.1;
            true
        } else {
            false
        }
    });
    if buckets.last().is_none_or(|b| b.0 != f64::INFINITY) || buckets.len() < 2 {
        return f64::NAN;
    }
    // Counts must not fall with the bound (they can, read mid-scrape).
    for i in 1..buckets.len() {
        if buckets[i].1 < buckets[i - 1].1 {
            buckets[i].1 = buckets[i - 1].1;
        }
    }
    let observations = buckets[buckets.len() - 1].1;
    if observations == 0.0 {
        return f64::NAN;
    }
    let mut rank = q * observations;
    let b = buckets.partition_point(|x| x.1 < rank);
    if b >= buckets.len() - 1 {
        return buckets[buckets.len() - 2].0;
    }
    if b == 0 && buckets[0].0 <= 0.0 {
        return buckets[0].0;
    }
    let (mut start, end, mut count) = (0.0, buckets[b].0, buckets[b].1);
    if b > 0 {
        start = buckets[b - 1].0;
        count -= buckets[b - 1].1;
        rank -= buckets[b - 1].1;
    }
    start + (end - start) * (rank / count)
}

fn math_function(name: &str) -> Option<fn(f64) -> f64> {
    Some(match name {
        "abs" => f64::abs,
        "ceil" => f64::ceil,
        "floor" => f64::floor,
        "exp" => f64::exp,
        "ln" => f64::ln,
        "log2" => f64::log2,
        "log10" => f64::log10,
        "sqrt" => f64::sqrt,
        "sgn" => |x: f64| {
            if x == 0.0 || x.is_nan() {
                x
            } else {
                x.signum()
            }
        },
        "sin" => f64::sin,
        "cos" => f64::cos,
        "tan" => f64::tan,
        "asin" => f64::asin,
        "acos" => f64::acos,
        "atan" => f64::atan,
        "sinh" => f64::sinh,
        "cosh" => f64::cosh,
        "tanh" => f64::tanh,
        "asinh" => f64::asinh,
        "acosh" => f64::acosh,
        "atanh" => f64::atanh,
        "deg" => f64::to_degrees,
        "rad" => f64::to_radians,
        _ => return None,
    })
}

fn date_part(name: &str, seconds: f64) -> Option<f64> {
    let t = chrono::DateTime::from_timestamp(seconds.floor() as i64, 0)?;
    Some(match name {
        "day_of_month" => t.day() as f64,
        "day_of_week" => t.weekday().num_days_from_sunday() as f64,
        "day_of_year" => t.ordinal() as f64,
        "days_in_month" => {
            let (y, m) = (t.year(), t.month());
            let next = if m == 12 {
                chrono::NaiveDate::from_ymd_opt(y + 1, 1, 1)
            } else {
                chrono::NaiveDate::from_ymd_opt(y, m + 1, 1)
            }?;
            next.pred_opt()?.day() as f64
        }
        "hour" => t.hour() as f64,
        "minute" => t.minute() as f64,
        "month" => t.month() as f64,
        _ => t.year() as f64,
    })
}

/// `sum`, `avg`, `topk`, … `by` / `without` labels, per step.
/// Where a series falls in `[0, 1)`, by a hash of its labels: the same
/// series always falls at the same place, so `limit_ratio(r)` and
/// `limit_ratio(r - 1)` split any set of series between them.
fn ratio_position(labels: &Labels) -> f64 {
    use std::hash::{Hash, Hasher};
    // FNV-1a over the labels: stable across processes and versions.
    struct Fnv(u64);
    impl Hasher for Fnv {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    labels.hash(&mut h);
    h.finish() as f64 / u64::MAX as f64
}

/// Neumaier's compensated sum, as Prometheus sums (so `1e100 + 1 - 1e100`
/// is 1).
fn kahan_sum(vals: &[f64]) -> f64 {
    let (mut sum, mut c) = (0.0f64, 0.0f64);
    for &v in vals {
        let t = sum + v;
        if t.is_infinite() {
            c = 0.0;
        } else if sum.abs() >= v.abs() {
            c += (sum - t) + v;
        } else {
            c += (v - t) + sum;
        }
        sum = t;
    }
    sum + c
}

/// The mean, compensated; by increments when the sum would overflow, as
/// Prometheus does for values near the float limit.
fn mean(vals: &[f64]) -> f64 {
    let sum = kahan_sum(vals);
    if sum.is_finite() || vals.iter().any(|v| v.is_infinite()) {
        return sum / vals.len() as f64;
    }
    let mut m = 0.0f64;
    for (i, &v) in vals.iter().enumerate() {
        m += v / (i + 1) as f64 - m / (i + 1) as f64;
    }
    m
}

/// Population variance by Welford's method, as Prometheus computes it:
/// equal values give exactly 0.
fn welford_variance(vals: &[f64]) -> f64 {
    let (mut count, mut m, mut m2) = (0.0f64, 0.0f64, 0.0f64);
    for &v in vals {
        count += 1.0;
        let delta = v - m;
        m += delta / count;
        m2 += delta * (v - m);
    }
    m2 / count
}

pub fn aggregate(
    op: &str,
    param: Option<Value>,
    series: Vec<Series>,
    modifier: Option<&LabelModifier>,
    steps: Steps,
) -> Result<Value, PromError> {
    let n = steps.len();
    let group_of = |labels: &Labels| -> Labels {
        match modifier {
            Some(LabelModifier::Include(by)) => labels
                .iter()
                .filter(|(l, _)| by.labels.iter().any(|b| b == l))
                .cloned()
                .collect(),
            Some(LabelModifier::Exclude(without)) => labels
                .iter()
                .filter(|(l, _)| l != METRIC_NAME && !without.labels.iter().any(|w| w == l))
                .cloned()
                .collect(),
            None => Vec::new(),
        }
    };
    let scalar_param = |what: &str| -> Result<Vec<f64>, PromError> {
        match &param {
            Some(Value::Scalar(v)) => Ok(v.clone()),
            _ => Err(PromError::BadData(format!(
                "{op}() needs a scalar {what} as its first argument"
            ))),
        }
    };
    let mut groups: Vec<(Labels, Vec<usize>)> = Vec::new();
    let mut index: HashMap<Labels, usize> = HashMap::new();
    for (i, s) in series.iter().enumerate() {
        let g = group_of(&s.labels);
        let at = *index.entry(g.clone()).or_insert_with(|| {
            groups.push((g, Vec::new()));
            groups.len() - 1
        });
        groups[at].1.push(i);
    }

    match op {
        "topk" | "bottomk" | "limitk" | "limit_ratio" => {
            let k = scalar_param(if op == "limit_ratio" { "ratio" } else { "k" })?;
            let mut keep = vec![vec![false; n]; series.len()];
            // An instant query's answer lists each group's series in the
            // order chosen (topk largest first), as Prometheus does.
            let mut order = Vec::new();
            for (_, members) in &groups {
                for i in 0..n {
                    let kk = k[i];
                    let mut present: Vec<(usize, f64)> = members
                        .iter()
                        .filter_map(|&m| series[m].values[i].map(|v| (m, v)))
                        .collect();
                    let chosen: Vec<usize> = match op {
                        "limit_ratio" => {
                            if kk.is_nan() {
                                return Err(PromError::BadData("Ratio value is NaN".into()));
                            }
                            let r = kk.clamp(-1.0, 1.0);
                            present
                                .iter()
                                .filter(|(m, _)| {
                                    let at = ratio_position(&series[*m].labels);
                                    (r >= 0.0 && at < r) || (r < 0.0 && at >= 1.0 + r)
                                })
                                .map(|(m, _)| *m)
                                .collect()
                        }
                        _ if kk.is_nan() || kk < 1.0 => Vec::new(),
                        "limitk" => present.iter().take(kk as usize).map(|(m, _)| *m).collect(),
                        _ => {
                            // NaN is never preferred: last for topk and for bottomk.
                            present.sort_by(|a, b| match (a.1.is_nan(), b.1.is_nan()) {
                                (true, true) => std::cmp::Ordering::Equal,
                                (true, false) => std::cmp::Ordering::Greater,
                                (false, true) => std::cmp::Ordering::Less,
                                _ if op == "topk" => b.1.total_cmp(&a.1),
                                _ => a.1.total_cmp(&b.1),
                            });
                            present.iter().take(kk as usize).map(|(m, _)| *m).collect()
                        }
                    };
                    for m in chosen {
                        if !keep[m].iter().any(|k| *k) {
                            order.push(m);
                        }
                        keep[m][i] = true;
                    }
                }
            }
            let mut series: Vec<Option<Series>> = series.into_iter().map(Some).collect();
            let out = order
                .into_iter()
                .filter_map(|m| {
                    let mut s = series[m].take()?;
                    for (v, k) in s.values.iter_mut().zip(&keep[m]) {
                        if !k {
                            *v = None;
                        }
                    }
                    Some(s)
                })
                .collect();
            Ok(Value::Vector(out))
        }
        "count_values" => {
            let label = match &param {
                Some(Value::String(s)) => s.clone(),
                _ => {
                    return Err(PromError::BadData(
                        "count_values() needs a label name string as its first argument".into(),
                    ));
                }
            };
            let mut out: Vec<Series> = Vec::new();
            let mut index: HashMap<Labels, usize> = HashMap::new();
            for (g, members) in &groups {
                for i in 0..n {
                    for &m in members {
                        let Some(v) = series[m].values[i] else {
                            continue;
                        };
                        let mut labels = g.clone();
                        value::set(&mut labels, &label, &value::format_number(v));
                        let at = *index.entry(labels.clone()).or_insert_with(|| {
                            out.push(Series {
                                labels,
                                values: vec![None; n],
                            });
                            out.len() - 1
                        });
                        let c = &mut out[at].values[i];
                        *c = Some(c.unwrap_or(0.0) + 1.0);
                    }
                }
            }
            Ok(Value::Vector(out))
        }
        _ => {
            let q = if op == "quantile" {
                Some(scalar_param("quantile")?)
            } else {
                None
            };
            let mut out = Vec::with_capacity(groups.len());
            for (labels, members) in groups {
                let values: Vec<Option<f64>> = (0..n)
                    .map(|i| {
                        let vals: Vec<f64> = members
                            .iter()
                            .filter_map(|&m| series[m].values[i])
                            .collect();
                        if vals.is_empty() {
                            return Ok(None);
                        }
                        let c = vals.len() as f64;
                        Ok(Some(match op {
                            "sum" => kahan_sum(&vals),
                            "avg" => mean(&vals),
                            "min" => vals.iter().copied().reduce(nan_min).unwrap_or(f64::NAN),
                            "max" => vals.iter().copied().reduce(nan_max).unwrap_or(f64::NAN),
                            "count" => c,
                            "group" => 1.0,
                            "stddev" | "stdvar" => {
                                let var = welford_variance(&vals);
                                if op == "stddev" { var.sqrt() } else { var }
                            }
                            "quantile" => quantile(q.as_ref().map_or(f64::NAN, |q| q[i]), vals),
                            other => {
                                return Err(PromError::BadData(format!(
                                    "aggregation {other}() is not supported by Lumen yet"
                                )));
                            }
                        }))
                    })
                    .collect::<Result<_, PromError>>()?;
                if values.iter().any(Option::is_some) {
                    out.push(Series { labels, values });
                }
            }
            Ok(Value::Vector(out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_extrapolates_as_prometheus_does() {
        // A counter sampled every 10 s over a 60 s window that it covers
        // from t=10 to t=60: 5 intervals, extended by one interval at the
        // start (less than 1.1 intervals away) and none at the end.
        let s: Vec<(i64, f64)> = (1..=6).map(|i| (i * 10_000, i as f64 * 10.0)).collect();
        let inc = extrapolated(&s, 0, 60_000, true, false).unwrap();
        assert!((inc - 60.0).abs() < 1e-9, "{inc}");
        let rate = extrapolated(&s, 0, 60_000, true, true).unwrap();
        assert!((rate - 1.0).abs() < 1e-9, "{rate}");
    }

    #[test]
    fn counter_resets_are_added_back() {
        let s = vec![(10_000, 5.0), (20_000, 8.0), (30_000, 2.0)];
        // 3 up, then a reset to 0 and 2 more: 5 over the 20 s sampled,
        // extended by the 10 s to each edge of the 40 s window.
        let inc = extrapolated(&s, 0, 40_000, true, false).unwrap();
        assert!((inc - 10.0).abs() < 1e-9, "{inc}");
    }

    #[test]
    fn histogram_quantile_interpolates_in_the_bucket() {
        let mut b = vec![(1.0, 10.0), (5.0, 30.0), (f64::INFINITY, 40.0)];
        // rank 20 of 40 falls in (1, 5]: 10 of its 20 observations in.
        assert_eq!(bucket_quantile(0.5, &mut b), 3.0);
        // Beyond the last finite bucket: its upper bound.
        let mut b = vec![(1.0, 10.0), (5.0, 30.0), (f64::INFINITY, 40.0)];
        assert_eq!(bucket_quantile(0.99, &mut b), 5.0);
        let mut none = vec![(1.0, 0.0), (f64::INFINITY, 0.0)];
        assert!(bucket_quantile(0.5, &mut none).is_nan());
    }

    #[test]
    fn quantile_interpolates_between_ranks() {
        assert_eq!(quantile(0.5, vec![1.0, 2.0, 3.0, 4.0]), 2.5);
        assert_eq!(quantile(0.0, vec![3.0, 1.0]), 1.0);
        assert_eq!(quantile(2.0, vec![3.0, 1.0]), f64::INFINITY);
    }
}
