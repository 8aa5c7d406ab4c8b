//! Prometheus's own PromQL engine tests (`promql/promqltest/testdata/*.test`
//! of Prometheus v3.5.0, in `tests/data/prometheus/promqltest/`) run
//! through Lumen's PromQL engine twice: once with every `load` block's
//! series handed to the evaluator, and once through the store as real data
//! arrives (each sample an OTLP gauge point through the WAL into
//! `metrics`, at the script's exact timestamp, queried with SQL as the HTTP
//! API does). Every `eval` is evaluated as an instant or range query and
//! the result compared as Prometheus's `promqltest` compares it (same
//! series by labels, values within a relative 1e-6, NaN equal to NaN,
//! order for `eval_ordered`, failure for `eval_fail` / `expect fail`).
//!
//! Cases Lumen cannot run are skipped with the reason (native histograms,
//! expressions the parser does not take). The report prints a table per
//! file; the test fails when a file passes fewer cases than its floor in
//! `FLOORS` (what passes today), so a regression fails CI.

use std::collections::BTreeMap;
use std::path::PathBuf;

use lumen_query::promql::PromError;
use lumen_query::promql::eval::{Evaluator, FixedSeries};
use lumen_query::promql::value::{Labels, RawSeries, Steps, Value};

/// Cases each file must pass at least (today's count): fewer is a regression.
const FLOORS: &[(&str, usize)] = &[
    ("aggregators", 133),
    ("at_modifier", 45),
    ("collision", 2),
    ("functions", 287),
    ("histograms", 55),
    ("limit", 14),
    ("literals", 20),
    ("operators", 134),
    ("range_queries", 8),
    ("selectors", 31),
    ("staleness", 17),
    ("subquery", 32),
    ("trig_functions", 19),
];

/// Prometheus's staleness marker: a NaN with this bit pattern.
const STALE_NAN: u64 = 0x7ff0_0000_0000_0002;

fn stale() -> f64 {
    f64::from_bits(STALE_NAN)
}

/// Prometheus's `almost.Equal` with its test epsilon.
fn almost_equal(a: f64, b: f64) -> bool {
    const EPSILON: f64 = 0.000001;
    const MIN_NORMAL: f64 = f64::MIN_POSITIVE;
    if a.to_bits() == STALE_NAN || b.to_bits() == STALE_NAN {
        return a.to_bits() == STALE_NAN && b.to_bits() == STALE_NAN;
    }
    if a.is_nan() && b.is_nan() {
        return true;
    }
    if a == b {
        return true;
    }
    let abs_sum = a.abs() + b.abs();
    let diff = (a - b).abs();
    if a == 0.0 || b == 0.0 || abs_sum < MIN_NORMAL {
        return diff < EPSILON * MIN_NORMAL;
    }
    diff / abs_sum.min(f64::MAX) < EPSILON
}

/// Go's `model.ParseDuration` (`1h30m`, `5m`, `0`, `100ms`, `2d`…) in ms.
fn duration_ms(s: &str) -> Option<i64> {
    if s == "0" {
        return Some(0);
    }
    let mut total = 0i64;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let n: i64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let ms = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 7 * 86_400_000,
            "y" => 365 * 86_400_000,
            _ => return None,
        };
        total += n * ms;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// A number as PromQL writes it (`1e3`, `0x1F`, `Inf`, `-inf`, `NaN`).
fn number(s: &str) -> Option<f64> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let v = match body.to_ascii_lowercase().as_str() {
        "inf" => f64::INFINITY,
        "nan" => f64::NAN,
        b if b.starts_with("0x") => i64::from_str_radix(&b[2..], 16).ok()? as f64,
        _ => body.parse::<f64>().ok()?,
    };
    Some(if neg { -v } else { v })
}

/// One value of a series description: a sample, or none at that step.
type Sample = Option<f64>;

/// `1 2 _ stale 1+2x3 5x2 _x3` expanded, as Prometheus's series parser
/// does (`axn` and `a+bxn` give n+1 values). `None` for histograms.
fn expand(values: &str) -> Option<Vec<Sample>> {
    let mut out = Vec::new();
    for item in values.split_whitespace() {
        if item.starts_with("{{") || item.ends_with("}}") {
            return None;
        }
        // `<value>x<n>`: the suffix after the last `x` is the count.
        let (base, times) = match item.rsplit_once('x') {
            Some((b, n))
                if !b.is_empty() && !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()) =>
            {
                (b, Some(n.parse::<usize>().ok()?))
            }
            _ => (item, None),
        };
        if base == "_" {
            out.extend(std::iter::repeat_n(None, times.unwrap_or(1)));
            continue;
        }
        if base == "stale" {
            let n = times.map_or(1, |n| n + 1);
            out.extend(std::iter::repeat_n(Some(stale()), n));
            continue;
        }
        // `a+b` / `a-b`: the sign after the first character that is not an
        // exponent's.
        let bytes = base.as_bytes();
        let split = (1..bytes.len()).find(|&i| {
            (bytes[i] == b'+' || bytes[i] == b'-') && !matches!(bytes[i - 1], b'e' | b'E')
        });
        let (start, step) = match split {
            Some(i) if times.is_some() => (number(&base[..i])?, number(&base[i..])?),
            None => (number(base)?, 0.0),
            Some(_) => return None,
        };
        match times {
            None => out.push(Some(start)),
            Some(n) => {
                let mut v = start;
                for _ in 0..=n {
                    out.push(Some(v));
                    v += step;
                }
            }
        }
    }
    Some(out)
}

/// `metric{a="b"} values` → its labels and the rest of the line.
fn series_desc(line: &str) -> Option<(Labels, &str)> {
    let (metric, rest) = match line.find('{') {
        Some(open) if !line[..open].contains(char::is_whitespace) => {
            let close = closing_brace(line, open)?;
            (&line[..=close], &line[close + 1..])
        }
        _ => match line.find(char::is_whitespace) {
            Some(i) => (&line[..i], &line[i..]),
            None => (line, ""),
        },
    };
    let labels = labels_of(metric)?;
    Some((labels, rest))
}

/// Where the `}` that closes the `{` at `open` is, quotes respected.
fn closing_brace(s: &str, open: usize) -> Option<usize> {
    let mut quoted = None;
    let mut escaped = false;
    for (i, c) in s[open..].char_indices() {
        match (quoted, c) {
            (Some(_), '\\') if !escaped => {
                escaped = true;
                continue;
            }
            (Some(q), c) if c == q && !escaped => quoted = None,
            (None, '"' | '\'' | '`') => quoted = Some(c),
            (None, '}') => return Some(open + i),
            _ => {}
        }
        escaped = false;
    }
    None
}

/// The labels of `metric{a="b"}` (or `{__name__="m", a="b"}`), by the
/// PromQL parser: a selector's equality matchers.
fn labels_of(metric: &str) -> Option<Labels> {
    let text = if metric.starts_with('{') && metric == "{}" {
        return Some(Vec::new());
    } else {
        metric
    };
    let expr = lumen_query::promql::parse(text).ok()?;
    let promql_parser::parser::Expr::VectorSelector(vs) = expr else {
        return None;
    };
    let mut labels: Labels = vs
        .matchers
        .matchers
        .iter()
        .filter(|m| !m.value.is_empty())
        .map(|m| (m.name.clone(), m.value.clone()))
        .collect();
    if let Some(name) = vs.name {
        labels.push(("__name__".into(), name));
    }
    labels.sort();
    labels.dedup();
    Some(labels)
}

/// Where loaded series live and evals run: in memory straight into the
/// evaluator, or in Lumen's store as real data arrives.
trait Backend {
    fn clear(&mut self);
    fn load(&mut self, series: Vec<RawSeries>);
    fn eval(&mut self, ev: &Eval) -> Result<Value, PromError>;
}

struct InMemory<'r> {
    store: FixedSeries,
    rt: &'r tokio::runtime::Runtime,
}

impl Backend for InMemory<'_> {
    fn clear(&mut self) {
        self.store = FixedSeries::default();
    }

    fn load(&mut self, series: Vec<RawSeries>) {
        for s in series {
            self.store.0.retain(|x| x.labels != s.labels);
            self.store.0.push(s);
        }
    }

    fn eval(&mut self, ev: &Eval) -> Result<Value, PromError> {
        let expr = lumen_query::promql::parse(&ev.expr)?;
        let evaluator = Evaluator {
            source: &self.store,
            query: ev.steps,
            lookback: 300_000,
        };
        self.rt.block_on(evaluator.eval(&expr, ev.steps))
    }
}

/// A collector's store in a temporary directory: each loaded sample goes
/// in as an OTLP gauge point through the WAL (as recording rules' results
/// do, with only the series' own labels), and evals go through
/// `promql::evaluate` — SQL over the `metrics` table — as the HTTP API's.
struct InStore<'r> {
    rt: &'r tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    opened: Option<(lumen_collector::Collector, lumen_query::engine::QueryEngine)>,
    generation: u32,
}

impl<'r> InStore<'r> {
    fn new(rt: &'r tokio::runtime::Runtime) -> Self {
        InStore {
            rt,
            dir: tempfile::tempdir().expect("temporary directory"),
            opened: None,
            generation: 0,
        }
    }

    fn open(&mut self) -> &(lumen_collector::Collector, lumen_query::engine::QueryEngine) {
        if self.opened.is_none() {
            self.generation += 1;
            let mut config = lumen_collector::CollectorConfig::new(
                self.dir.path().join(self.generation.to_string()),
            );
            config.otlp_grpc = None;
            config.otlp_http = None;
            let collector = self
                .rt
                .block_on(lumen_collector::Collector::open(config))
                .expect("collector");
            let engine = lumen_query::engine::QueryEngine::new(
                collector.store(),
                lumen_query::engine::QueryConfig::default(),
            )
            .expect("query engine");
            self.opened = Some((collector, engine));
        }
        self.opened.as_ref().expect("opened")
    }
}

impl Backend for InStore<'_> {
    fn clear(&mut self) {
        self.opened = None;
    }

    fn load(&mut self, series: Vec<RawSeries>) {
        use lumen_collector::events::{RecordedSample, RecordingWriter};
        let mut at: BTreeMap<i64, Vec<RecordedSample>> = BTreeMap::new();
        for s in series {
            let Some(name) = s
                .labels
                .iter()
                .find(|(k, _)| k == "__name__")
                .map(|(_, v)| v.clone())
            else {
                continue;
            };
            let labels: Vec<(String, String)> = s
                .labels
                .iter()
                .filter(|(k, _)| k != "__name__")
                .cloned()
                .collect();
            for (t, v) in s.samples {
                at.entry(t).or_default().push(RecordedSample {
                    name: name.clone(),
                    labels: labels.clone(),
                    value: v,
                });
            }
        }
        let rt = self.rt;
        let writer = RecordingWriter::new(self.open().0.writer());
        for (t, samples) in at {
            let when = std::time::UNIX_EPOCH + std::time::Duration::from_millis(t.max(0) as u64);
            rt.block_on(writer.write(when, samples)).expect("stored");
        }
    }

    fn eval(&mut self, ev: &Eval) -> Result<Value, PromError> {
        let rt = self.rt;
        let engine = self.open().1.clone();
        rt.block_on(lumen_query::promql::evaluate(
            &engine,
            lumen_query::promql::PromQuery {
                expr: ev.expr.clone(),
                steps: ev.steps,
                lookback: std::time::Duration::from_secs(300),
                origin: "promqltest".into(),
                raw: false,
                cache: None,
            },
        ))
    }
}

enum Expected {
    Scalar(f64),
    /// Labels and their values per step (`None`: no point).
    Series(Vec<(Labels, Vec<Sample>)>),
}

struct Eval {
    line: usize,
    expr: String,
    steps: Steps,
    fail: bool,
    ordered: bool,
    expected: Expected,
    /// Why it cannot be run, if so.
    skip: Option<String>,
}

enum Outcome {
    Pass,
    Fail(String),
    Skip(String),
}

#[derive(Default)]
struct Tally {
    run: usize,
    passed: usize,
    failed: Vec<(usize, String, String)>,
    skipped: BTreeMap<String, usize>,
}

fn run_eval(backend: &mut dyn Backend, ev: &Eval) -> Outcome {
    if let Some(why) = &ev.skip {
        return Outcome::Skip(why.clone());
    }
    if let Err(e) = lumen_query::promql::parse(&ev.expr) {
        return match ev.fail {
            true => Outcome::Pass,
            false => Outcome::Skip(format!("the parser does not take it: {e}")),
        };
    }
    let result = backend.eval(ev);
    match (result, ev.fail) {
        (Err(_), true) => Outcome::Pass,
        (Ok(v), true) => Outcome::Fail(format!("expected an error, got a {}", v.kind())),
        (Err(e), false) => Outcome::Fail(format!("error: {e}")),
        (Ok(v), false) => compare(ev, v),
    }
}

fn compare(ev: &Eval, value: Value) -> Outcome {
    let instant = ev.steps.start == ev.steps.end;
    match (&ev.expected, value) {
        (Expected::Scalar(want), Value::Scalar(got)) => match got.first() {
            Some(g) if almost_equal(*want, *g) => Outcome::Pass,
            other => Outcome::Fail(format!("expected scalar {want}, got {other:?}")),
        },
        (Expected::Scalar(want), v) => {
            Outcome::Fail(format!("expected scalar {want}, got a {}", v.kind()))
        }
        (Expected::Series(_), Value::Scalar(_)) if !instant => {
            Outcome::Fail("expected a matrix, got a scalar".into())
        }
        (Expected::Series(want), Value::Scalar(got)) => {
            // Prometheus's range query of a scalar returns a matrix of one
            // series without labels.
            let series = vec![(Vec::new(), got.into_iter().map(Some).collect::<Vec<_>>())];
            compare_series(ev, want, series)
        }
        (Expected::Series(want), Value::Vector(got)) => {
            let series = got
                .into_iter()
                .filter(|s| s.values.iter().any(Option::is_some))
                .map(|s| (s.labels, s.values))
                .collect();
            compare_series(ev, want, series)
        }
        (Expected::Series(_), Value::Matrix(_)) => {
            Outcome::Skip("a range vector as the result of an instant query".into())
        }
        (Expected::Series(_), Value::String(_)) => {
            Outcome::Fail("expected a vector, got a string".into())
        }
    }
}

fn compare_series(
    ev: &Eval,
    want: &[(Labels, Vec<Sample>)],
    got: Vec<(Labels, Vec<Sample>)>,
) -> Outcome {
    for (pos, (labels, values)) in got.iter().enumerate() {
        let Some(i) = want.iter().position(|(l, _)| l == labels) else {
            return Outcome::Fail(format!("unexpected series {labels:?} with {values:?}"));
        };
        if ev.ordered && i != pos {
            return Outcome::Fail(format!("{labels:?} at position {pos}, expected at {i}"));
        }
        let expected = &want[i].1;
        for (step, v) in values.iter().enumerate() {
            let e = expected.get(step).copied().flatten();
            match (e, v) {
                (None, None) => {}
                (Some(e), Some(v)) if almost_equal(e, *v) => {}
                (e, v) => {
                    return Outcome::Fail(format!(
                        "{labels:?} at step {step}: expected {e:?}, got {v:?}"
                    ));
                }
            }
        }
        if expected.len() > values.len() && expected[values.len()..].iter().any(Option::is_some) {
            return Outcome::Fail(format!("{labels:?}: fewer points than expected"));
        }
    }
    for (labels, values) in want {
        if values.iter().any(Option::is_some) && !got.iter().any(|(l, _)| l == labels) {
            return Outcome::Fail(format!("expected series {labels:?} not found"));
        }
    }
    Outcome::Pass
}

/// Reads a script and runs it: loads accumulate until `clear`.
fn run_file(name: &str, text: &str, backend: &mut dyn Backend) -> Tally {
    let lines: Vec<&str> = text
        .lines()
        .map(|l| {
            let l = l.trim();
            if l.starts_with('#') { "" } else { l }
        })
        .collect();
    let mut tally = Tally::default();
    let mut native = false;
    // Names `load_with_nhcb` gave a native (custom-bucket) histogram.
    let mut nhcb: Vec<String> = Vec::new();
    // Series not loaded because (some of) their samples are native
    // histograms.
    let mut native_names: Vec<String> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        if line.is_empty() {
            continue;
        }
        if line == "clear" {
            backend.clear();
            native = false;
            nhcb.clear();
            native_names.clear();
            continue;
        }
        if let Some(rest) = line
            .strip_prefix("load_with_nhcb ")
            .or_else(|| line.strip_prefix("load "))
        {
            // `load_with_nhcb` also stores each classic histogram as a native one
            // (with custom buckets); its classic series are loaded here.
            let gap = duration_ms(rest.trim()).unwrap_or(60_000);
            let mut loaded = Vec::new();
            while i < lines.len() && !lines[i].is_empty() {
                let def = lines[i];
                i += 1;
                let Some((labels, values)) = series_desc(def) else {
                    continue;
                };
                if line.starts_with("load_with_nhcb") {
                    let name = labels.iter().find(|(k, _)| k == "__name__");
                    if let Some(base) = name.and_then(|(_, n)| n.strip_suffix("_bucket")) {
                        nhcb.push(base.to_string());
                    }
                }
                let Some(values) = expand(values) else {
                    // A native histogram series: not stored.
                    native = true;
                    if let Some((_, n)) = labels.iter().find(|(k, _)| k == "__name__") {
                        native_names.push(n.clone());
                    }
                    continue;
                };
                let samples = values
                    .iter()
                    .enumerate()
                    .filter_map(|(k, v)| v.map(|v| (k as i64 * gap, v)))
                    .collect();
                loaded.push(RawSeries { labels, samples });
            }
            backend.load(loaded);
            continue;
        }
        if line.starts_with("eval") {
            let start = i;
            let mut body = Vec::new();
            while i < lines.len() && !lines[i].is_empty() {
                body.push(lines[i]);
                i += 1;
            }
            let mut ev = parse_eval(line, &body, start, native);
            if ev.skip.is_none() && nhcb.iter().any(|n| names_whole(&ev.expr, n)) {
                ev.skip = Some(
                    "native histograms (the custom-bucket copy `load_with_nhcb` makes)".into(),
                );
            }
            // It reads series of which some were native histograms (not
            // loaded): a result equal to Prometheus's still passes; a
            // different one is put down to the missing histograms.
            let reads_native = native_names.iter().any(|n| names_whole(&ev.expr, n));
            tally.run += 1;
            let outcome = match run_eval(backend, &ev) {
                Outcome::Fail(_) if reads_native => Outcome::Skip("native histograms".into()),
                other => other,
            };
            match outcome {
                Outcome::Pass => tally.passed += 1,
                Outcome::Fail(why) => tally.failed.push((ev.line, ev.expr.clone(), why)),
                Outcome::Skip(why) => {
                    tally.run -= 1;
                    *tally.skipped.entry(why).or_default() += 1;
                }
            }
            continue;
        }
        panic!("{name}:{i}: a line the harness does not know: {line}");
    }
    tally
}

/// Whether `expr` names the metric `name` itself (not `name_bucket`).
fn names_whole(expr: &str, name: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    expr.match_indices(name).any(|(at, _)| {
        let before = expr[..at].chars().next_back();
        let after = expr[at + name.len()..].chars().next();
        !before.is_some_and(word) && !after.is_some_and(word)
    })
}

fn parse_eval(line: &str, body: &[&str], at_line: usize, native: bool) -> Eval {
    let (head, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    let modifier = head
        .strip_prefix("eval")
        .unwrap_or("")
        .trim_start_matches('_');
    let rest = rest.trim();
    let mut skip = None;
    let (steps, expr) = if let Some(r) = rest.strip_prefix("instant") {
        let r = r.trim();
        let (t, expr) = match r.strip_prefix("at ") {
            Some(r) => {
                let r = r.trim();
                let (t, e) = r.split_once(char::is_whitespace).unwrap_or((r, ""));
                (duration_ms(t), e.trim())
            }
            None => (Some(0), r),
        };
        (Steps::instant(t.unwrap_or(0)), expr)
    } else if let Some(r) = rest.strip_prefix("range from ") {
        let parts: Vec<&str> = r.splitn(6, char::is_whitespace).collect();
        // from <a> to <b> step <s> <expr>
        let (a, b, s) = (
            duration_ms(parts[0]),
            parts.get(2).and_then(|p| duration_ms(p)),
            parts.get(4).and_then(|p| duration_ms(p)),
        );
        let expr = parts.get(5).copied().unwrap_or("");
        match (a, b, s) {
            (Some(a), Some(b), Some(s)) => (
                Steps {
                    start: a,
                    end: b,
                    step: s.max(1),
                },
                expr,
            ),
            _ => {
                skip = Some("a time the harness cannot read".to_string());
                (Steps::instant(0), expr)
            }
        }
    } else {
        skip = Some(format!("eval form not known: {line}"));
        (Steps::instant(0), "")
    };
    let mut fail = modifier == "fail";
    let mut ordered = modifier == "ordered";
    let mut expected = Vec::new();
    let mut scalar = None;
    for l in body {
        if l.starts_with("expected_fail_") {
            continue;
        }
        if let Some(e) = l.strip_prefix("expect ") {
            let kind = e.split_whitespace().next().unwrap_or("");
            match kind {
                "fail" => fail = true,
                "ordered" => ordered = true,
                // Annotations (warnings, infos): Lumen's engine does not
                // return them; the result is still compared.
                _ => {}
            }
            continue;
        }
        if let Some(v) = number(l) {
            scalar = Some(v);
            continue;
        }
        match series_desc(l).and_then(|(labels, values)| Some((labels, expand(values)?))) {
            Some(s) => expected.push(s),
            None if l.contains("{{") => skip = Some("native histograms".into()),
            None => skip = Some(format!("an expected line the harness cannot read: {l}")),
        }
    }
    if native
        && skip.is_none()
        && (line.contains("histogram") || body.iter().any(|l| l.contains("{{")))
    {
        skip = Some("native histograms".into());
    }
    let expected = match scalar {
        Some(v) if expected.is_empty() => Expected::Scalar(v),
        _ => Expected::Series(expected),
    };
    Eval {
        line: at_line,
        expr: expr.to_string(),
        steps,
        fail,
        ordered,
        expected,
        skip,
    }
}

/// Runs every file on `backend`; fails when a file passes fewer than its
/// floor.
fn run_all(what: &str, floors: &[(&str, usize)], mut backend: impl Backend) {
    // Run time, not compile time: a shared target directory may have
    // compiled this test in another checkout.
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), PathBuf::from)
        .join("../tests/data/prometheus/promqltest");
    let mut report =
        format!("{what}\n| file | run | passed | failed | skipped |\n|---|---:|---:|---:|---:|\n");
    let mut regressions = Vec::new();
    let mut failures = String::new();
    for (name, floor) in floors {
        let path = dir.join(format!("{name}.test"));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        backend.clear();
        let t = run_file(name, &text, &mut backend);
        let skipped: usize = t.skipped.values().sum();
        report.push_str(&format!(
            "| {name} | {} | {} | {} | {skipped} |\n",
            t.run,
            t.passed,
            t.failed.len()
        ));
        for (why, n) in &t.skipped {
            failures.push_str(&format!("{name}: skipped {n}: {why}\n"));
        }
        for (line, expr, why) in &t.failed {
            failures.push_str(&format!("{name}:{line}: {expr}\n    {why}\n"));
        }
        if t.passed < *floor {
            regressions.push(format!("{name}: {} passed, floor {floor}", t.passed));
        }
    }
    println!("{report}\n{failures}");
    assert!(
        regressions.is_empty(),
        "fewer cases pass than before: {regressions:?}\n{report}"
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn prometheus_promql_test_scripts() {
    let rt = runtime();
    run_all(
        "Lumen's evaluator over the scripts' series",
        FLOORS,
        InMemory {
            store: FixedSeries::default(),
            rt: &rt,
        },
    );
}

#[test]
fn prometheus_promql_test_scripts_through_the_store() {
    let rt = runtime();
    run_all(
        "through the store (OTLP gauges, WAL, SQL over `metrics`)",
        FLOORS,
        InStore::new(&rt),
    );
}
