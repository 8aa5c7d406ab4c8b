//! PromQL evaluation, step by step as Prometheus's engine defines it:
//! selectors read the latest sample within the lookback, range functions
//! read the samples in `(t - range, t]`, subqueries evaluate their inner
//! expression at steps aligned to their resolution, and every operator
//! works per step on the series present at that step.
//!
//! Samples come from a [`Source`]; the store's source reads rollups, a test
//! source serves fixed series.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use promql_parser::label::{MatchOp, Matchers};
use promql_parser::parser::{
    AggregateExpr, AtModifier, BinaryExpr, Call, Expr, LabelModifier, Offset, SubqueryExpr,
    VectorMatchCardinality, VectorSelector,
};

use super::PromError;
use super::functions;
use super::value::{self, Labels, METRIC_NAME, RawSeries, Series, Steps, Value};

/// Where selectors get their samples.
#[async_trait::async_trait]
pub trait Source: Send + Sync {
    /// The series `selector`'s name and matchers select, with their samples
    /// in `(from, to]` (milliseconds). `range` is the window a range
    /// function reads (`None` for an instant selector): samples must be
    /// dense enough for it.
    async fn select(
        &self,
        selector: &VectorSelector,
        from: i64,
        to: i64,
        range: Option<i64>,
    ) -> Result<Vec<RawSeries>, PromError>;
}

/// Prometheus's staleness marker: the NaN a series gets when it stops
/// (a target gone, a rule that no longer yields it).
pub const STALE_NAN: u64 = 0x7ff0_0000_0000_0002;

pub fn is_stale(v: f64) -> bool {
    v.to_bits() == STALE_NAN
}

/// Prometheus's default lookback (staleness) window.
pub const DEFAULT_LOOKBACK: Duration = Duration::from_secs(300);
/// Resolution of a subquery without one: Prometheus's default evaluation interval.
pub const DEFAULT_SUBQUERY_STEP: Duration = Duration::from_secs(60);
/// Most samples one query may hold at once, as Prometheus's `--query.max-samples`.
pub const MAX_SAMPLES: usize = 50_000_000;

pub struct Evaluator<'a> {
    pub source: &'a dyn Source,
    /// The query's own steps: what `@ start()` and `@ end()` refer to.
    pub query: Steps,
    pub lookback: i64,
}

pub fn millis(d: &Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

pub fn system_millis(t: &SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => millis(&d),
        Err(e) => -millis(&e.duration()),
    }
}

fn offset_millis(offset: &Option<Offset>) -> i64 {
    match offset {
        None => 0,
        Some(Offset::Pos(d)) => millis(d),
        Some(Offset::Neg(d)) => -millis(d),
    }
}

/// The samples of `samples` within `(start, end]`.
pub fn window(samples: &[(i64, f64)], start: i64, end: i64) -> &[(i64, f64)] {
    let lo = samples.partition_point(|s| s.0 <= start);
    let hi = samples.partition_point(|s| s.0 <= end);
    &samples[lo..hi.max(lo)]
}

/// The samples a range function reads: raw series and each step's window.
pub struct RangeArg {
    pub series: Vec<RawSeries>,
    /// `(start, end]` per step.
    pub windows: Vec<(i64, i64)>,
}

impl Evaluator<'_> {
    /// When a step at `t` reads its data, after `@` and `offset`.
    fn at(&self, t: i64, at: &Option<AtModifier>, offset: &Option<Offset>) -> i64 {
        let base = match at {
            None => t,
            Some(AtModifier::Start) => self.query.start,
            Some(AtModifier::End) => self.query.end,
            Some(AtModifier::At(time)) => system_millis(time),
        };
        base - offset_millis(offset)
    }

    pub fn eval<'e>(
        &'e self,
        expr: &'e Expr,
        steps: Steps,
    ) -> BoxFuture<'e, Result<Value, PromError>> {
        Box::pin(async move {
            let n = steps.len();
            match expr {
                Expr::NumberLiteral(l) => Ok(Value::Scalar(vec![l.val; n])),
                Expr::StringLiteral(s) => Ok(Value::String(s.val.clone())),
                Expr::Paren(p) => self.eval(&p.expr, steps).await,
                Expr::Unary(u) => match self.eval(&u.expr, steps).await? {
                    Value::Scalar(v) => Ok(Value::Scalar(v.into_iter().map(|x| -x).collect())),
                    Value::Vector(mut series) => {
                        for s in &mut series {
                            value::remove(&mut s.labels, METRIC_NAME);
                            for v in s.values.iter_mut().flatten() {
                                *v = -*v;
                            }
                        }
                        functions::unique_labelsets(&series)?;
                        Ok(Value::Vector(series))
                    }
                    other => Err(PromError::BadData(format!(
                        "unary minus needs a scalar or an instant vector, not a {}",
                        other.kind()
                    ))),
                },
                Expr::VectorSelector(vs) => Ok(Value::Vector(self.selector(vs, steps).await?)),
                Expr::MatrixSelector(_) | Expr::Subquery(_) => {
                    if n != 1 {
                        return Err(PromError::BadData(
                            "invalid expression type \"range vector\" for range query, must be Scalar or instant Vector".into(),
                        ));
                    }
                    let arg = self.range_arg(expr, steps).await?;
                    let (start, end) = arg.windows[0];
                    let series = arg
                        .series
                        .into_iter()
                        .filter_map(|s| {
                            let samples = window(&s.samples, start, end).to_vec();
                            (!samples.is_empty()).then_some(RawSeries {
                                labels: s.labels,
                                samples,
                            })
                        })
                        .collect();
                    Ok(Value::Matrix(series))
                }
                Expr::Call(call) => self.call(call, steps).await,
                Expr::Aggregate(agg) => self.aggregate(agg, steps).await,
                Expr::Binary(bin) => self.binary(bin, steps).await,
                Expr::Extension(_) => Err(PromError::BadData("unsupported expression".into())),
            }
        })
    }

    /// An instant vector selector: at each step, the latest sample within the lookback.
    async fn selector(&self, vs: &VectorSelector, steps: Steps) -> Result<Vec<Series>, PromError> {
        self.selected(vs, steps, false).await
    }

    /// An instant selector's series, with each step's sample value, or
    /// (`times`) the sample's timestamp in seconds, as `timestamp()` reads
    /// it. A series whose latest sample is Prometheus's staleness marker
    /// has no value there.
    pub async fn selected(
        &self,
        vs: &VectorSelector,
        steps: Steps,
        times_of: bool,
    ) -> Result<Vec<Series>, PromError> {
        let times: Vec<i64> = steps
            .times()
            .map(|t| self.at(t, &vs.at, &vs.offset))
            .collect();
        let lo = times.iter().copied().min().unwrap_or(steps.start);
        let hi = times.iter().copied().max().unwrap_or(steps.end);
        let raw = self.source.select(vs, lo - self.lookback, hi, None).await?;
        Ok(raw
            .into_iter()
            .filter_map(|s| {
                let values: Vec<Option<f64>> = times
                    .iter()
                    .map(|&t| {
                        let i = s.samples.partition_point(|p| p.0 <= t);
                        let (at, v) = *s.samples.get(i.checked_sub(1)?)?;
                        (at > t - self.lookback && !is_stale(v))
                            .then(|| if times_of { at as f64 / 1000.0 } else { v })
                    })
                    .collect();
                values.iter().any(Option::is_some).then_some(Series {
                    labels: s.labels,
                    values,
                })
            })
            .collect())
    }

    /// Each series `vs` selects with its latest sample at `t` (within the
    /// lookback, not a staleness marker): labels, value, time in ms — what
    /// Prometheus's `/federate` serves.
    pub async fn latest(
        &self,
        vs: &VectorSelector,
        t: i64,
    ) -> Result<Vec<(value::Labels, f64, i64)>, PromError> {
        let at = self.at(t, &vs.at, &vs.offset);
        let raw = self.source.select(vs, at - self.lookback, at, None).await?;
        Ok(raw
            .into_iter()
            .filter_map(|s| {
                let &(time, v) = s.samples.iter().rev().find(|p| p.0 <= at)?;
                (time > at - self.lookback && !is_stale(v)).then_some((s.labels, v, time))
            })
            .collect())
    }

    /// A range vector (selector or subquery) and the window each step reads.
    pub fn range_arg<'e>(
        &'e self,
        expr: &'e Expr,
        steps: Steps,
    ) -> BoxFuture<'e, Result<RangeArg, PromError>> {
        Box::pin(async move {
            match expr {
                Expr::Paren(p) => self.range_arg(&p.expr, steps).await,
                Expr::MatrixSelector(ms) => {
                    let range = millis(&ms.range);
                    let ends: Vec<i64> = steps
                        .times()
                        .map(|t| self.at(t, &ms.vs.at, &ms.vs.offset))
                        .collect();
                    let lo = ends.iter().copied().min().unwrap_or(steps.start);
                    let hi = ends.iter().copied().max().unwrap_or(steps.end);
                    let mut series = self
                        .source
                        .select(&ms.vs, lo - range, hi, Some(range))
                        .await?;
                    // Range functions never see staleness markers.
                    for s in &mut series {
                        s.samples.retain(|p| !is_stale(p.1));
                    }
                    Ok(RangeArg {
                        series,
                        windows: ends.into_iter().map(|e| (e - range, e)).collect(),
                    })
                }
                Expr::Subquery(sq) => self.subquery(sq, steps).await,
                other => Err(PromError::BadData(format!(
                    "expected a range vector (a selector with [range] or a subquery), got {}",
                    kind_of(other)
                ))),
            }
        })
    }

    async fn subquery(&self, sq: &SubqueryExpr, steps: Steps) -> Result<RangeArg, PromError> {
        let range = millis(&sq.range);
        let step = sq
            .step
            .as_ref()
            .map(millis)
            .unwrap_or(millis(&DEFAULT_SUBQUERY_STEP))
            .max(1);
        let ends: Vec<i64> = steps
            .times()
            .map(|t| self.at(t, &sq.at, &sq.offset))
            .collect();
        let lo = ends.iter().copied().min().unwrap_or(steps.start) - range;
        let hi = ends.iter().copied().max().unwrap_or(steps.end);
        let windows: Vec<(i64, i64)> = ends.iter().map(|&e| (e - range, e)).collect();
        // Inner steps are multiples of the resolution, as in Prometheus, so
        // that consecutive evaluations see the same points.
        let mut start = lo.div_euclid(step) * step;
        if start <= lo {
            start += step;
        }
        if start > hi {
            return Ok(RangeArg {
                series: Vec::new(),
                windows,
            });
        }
        let inner = Steps {
            start,
            end: hi,
            step,
        };
        if inner.len() > 11_000 {
            return Err(PromError::BadData(format!(
                "subquery has {} steps: more than 11,000; raise its resolution",
                inner.len()
            )));
        }
        let series = match self.eval(&sq.expr, inner).await? {
            Value::Vector(v) => v
                .into_iter()
                .map(|s| RawSeries {
                    samples: s
                        .values
                        .iter()
                        .enumerate()
                        .filter_map(|(i, v)| v.map(|v| (inner.time(i), v)))
                        .collect(),
                    labels: s.labels,
                })
                .collect(),
            Value::Scalar(v) => vec![RawSeries {
                labels: Vec::new(),
                samples: v
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (inner.time(i), *v))
                    .collect(),
            }],
            other => {
                return Err(PromError::BadData(format!(
                    "a subquery needs an instant vector or a scalar, got a {}",
                    other.kind()
                )));
            }
        };
        Ok(RangeArg { series, windows })
    }

    async fn call(&self, call: &Call, steps: Steps) -> Result<Value, PromError> {
        let v = functions::call(self, call, steps).await?;
        if let Value::Vector(series) = &v {
            functions::unique_labelsets(series)?;
        }
        Ok(v)
    }

    async fn aggregate(&self, agg: &AggregateExpr, steps: Steps) -> Result<Value, PromError> {
        let op = agg.op.to_string();
        let param = match &agg.param {
            Some(p) => Some(self.eval(p, steps).await?),
            None => None,
        };
        let series = match self.eval(&agg.expr, steps).await? {
            Value::Vector(v) => v,
            other => {
                return Err(PromError::BadData(format!(
                    "{op}() needs an instant vector, got a {}",
                    other.kind()
                )));
            }
        };
        functions::aggregate(&op, param, series, agg.modifier.as_ref(), steps)
    }

    async fn binary(&self, bin: &BinaryExpr, steps: Steps) -> Result<Value, PromError> {
        let lhs = self.eval(&bin.lhs, steps).await?;
        let rhs = self.eval(&bin.rhs, steps).await?;
        let op = bin.op.to_string();
        let return_bool = bin.return_bool();
        let n = steps.len();
        match (lhs, rhs) {
            (Value::Scalar(a), Value::Scalar(b)) => {
                if is_comparison(&op) && !return_bool {
                    return Err(PromError::BadData(
                        "comparisons between scalars must use the bool modifier".into(),
                    ));
                }
                Ok(Value::Scalar(
                    (0..n)
                        .map(|i| apply(&op, a[i], b[i], true).unwrap_or(f64::NAN))
                        .collect(),
                ))
            }
            (Value::Vector(v), Value::Scalar(s)) => Ok(Value::Vector(vector_scalar(
                &op,
                v,
                &s,
                false,
                return_bool,
            )?)),
            (Value::Scalar(s), Value::Vector(v)) => {
                Ok(Value::Vector(vector_scalar(&op, v, &s, true, return_bool)?))
            }
            (Value::Vector(a), Value::Vector(b)) => {
                let card = bin
                    .modifier
                    .as_ref()
                    .map(|m| m.card.clone())
                    .unwrap_or(VectorMatchCardinality::OneToOne);
                let matching = bin.modifier.as_ref().and_then(|m| m.matching.clone());
                if is_set(&op) {
                    Ok(Value::Vector(set_op(&op, a, b, matching.as_ref(), n)))
                } else {
                    Ok(Value::Vector(vector_vector(
                        &op,
                        a,
                        b,
                        &card,
                        matching.as_ref(),
                        return_bool,
                        n,
                    )?))
                }
            }
            (l, r) => Err(PromError::BadData(format!(
                "operator {op} is not defined between a {} and a {}",
                l.kind(),
                r.kind()
            ))),
        }
    }
}

fn kind_of(expr: &Expr) -> &'static str {
    match expr {
        Expr::NumberLiteral(_) => "a number",
        Expr::StringLiteral(_) => "a string",
        Expr::VectorSelector(_) => "an instant vector selector",
        _ => "an expression that is not a range vector",
    }
}

pub fn is_comparison(op: &str) -> bool {
    matches!(op, "==" | "!=" | ">" | "<" | ">=" | "<=")
}

fn is_set(op: &str) -> bool {
    matches!(op, "and" | "or" | "unless")
}

/// `a op b`; for comparisons, `Some(a)` (or 1) when true and `None`
/// (or 0) when false, as filter or `bool` want it.
fn apply(op: &str, a: f64, b: f64, return_bool: bool) -> Option<f64> {
    let cmp = |c: bool| match (c, return_bool) {
        (true, true) => Some(1.0),
        (false, true) => Some(0.0),
        (true, false) => Some(a),
        (false, false) => None,
    };
    match op {
        "+" => Some(a + b),
        "-" => Some(a - b),
        "*" => Some(a * b),
        "/" => Some(a / b),
        "%" => Some(a % b),
        "^" => Some(a.powf(b)),
        "atan2" => Some(a.atan2(b)),
        "==" => cmp(a == b),
        "!=" => cmp(a != b),
        ">" => cmp(a > b),
        "<" => cmp(a < b),
        ">=" => cmp(a >= b),
        "<=" => cmp(a <= b),
        _ => None,
    }
}

fn vector_scalar(
    op: &str,
    series: Vec<Series>,
    scalar: &[f64],
    scalar_left: bool,
    return_bool: bool,
) -> Result<Vec<Series>, PromError> {
    let comparison = is_comparison(op);
    let mut out = Vec::with_capacity(series.len());
    for mut s in series {
        if !comparison || return_bool {
            value::remove(&mut s.labels, METRIC_NAME);
        }
        for (i, v) in s.values.iter_mut().enumerate() {
            if let Some(x) = *v {
                let (a, b) = if scalar_left {
                    (scalar[i], x)
                } else {
                    (x, scalar[i])
                };
                *v = match apply(op, a, b, return_bool) {
                    // A filter keeps the vector's own value.
                    Some(_) if comparison && !return_bool => Some(x),
                    r => r,
                };
            }
        }
        if s.values.iter().any(Option::is_some) {
            out.push(s);
        }
    }
    Ok(out)
}

/// The labels two series are matched on.
fn signature(labels: &Labels, matching: Option<&LabelModifier>) -> Labels {
    match matching {
        Some(LabelModifier::Include(on)) => labels
            .iter()
            .filter(|(n, _)| on.labels.iter().any(|l| l == n))
            .cloned()
            .collect(),
        Some(LabelModifier::Exclude(ignoring)) => labels
            .iter()
            .filter(|(n, _)| n != METRIC_NAME && !ignoring.labels.iter().any(|l| l == n))
            .cloned()
            .collect(),
        None => labels
            .iter()
            .filter(|(n, _)| n != METRIC_NAME)
            .cloned()
            .collect(),
    }
}

fn set_op(
    op: &str,
    lhs: Vec<Series>,
    rhs: Vec<Series>,
    matching: Option<&LabelModifier>,
    n: usize,
) -> Vec<Series> {
    // Per step, the signatures present on each side.
    let sigs = |side: &[Series]| -> Vec<Labels> {
        side.iter()
            .map(|s| signature(&s.labels, matching))
            .collect()
    };
    let (lsig, rsig) = (sigs(&lhs), sigs(&rhs));
    let present =
        |side: &[Series], sig: &[Labels], i: usize| -> std::collections::HashSet<Labels> {
            side.iter()
                .zip(sig)
                .filter(|(s, _)| s.values[i].is_some())
                .map(|(_, g)| g.clone())
                .collect()
        };
    let mut out: Vec<Series> = Vec::new();
    match op {
        "and" | "unless" => {
            let keep_if = op == "and";
            let rsteps: Vec<_> = (0..n).map(|i| present(&rhs, &rsig, i)).collect();
            for (mut s, sig) in lhs.into_iter().zip(lsig) {
                for (i, v) in s.values.iter_mut().enumerate() {
                    if v.is_some() && rsteps[i].contains(&sig) != keep_if {
                        *v = None;
                    }
                }
                if s.values.iter().any(Option::is_some) {
                    out.push(s);
                }
            }
        }
        _ => {
            let lsteps: Vec<_> = (0..n).map(|i| present(&lhs, &lsig, i)).collect();
            out.extend(lhs);
            for (mut s, sig) in rhs.into_iter().zip(rsig) {
                for (i, v) in s.values.iter_mut().enumerate() {
                    if v.is_some() && lsteps[i].contains(&sig) {
                        *v = None;
                    }
                }
                if s.values.iter().any(Option::is_some) {
                    merge_into(&mut out, s);
                }
            }
        }
    }
    out
}

/// Adds `s` to `out`, joining it with a series of the same labels (their
/// steps do not overlap where this is used).
fn merge_into(out: &mut Vec<Series>, s: Series) {
    if let Some(existing) = out.iter_mut().find(|e| e.labels == s.labels) {
        for (a, b) in existing.values.iter_mut().zip(s.values) {
            if a.is_none() {
                *a = b;
            }
        }
    } else {
        out.push(s);
    }
}

fn vector_vector(
    op: &str,
    lhs: Vec<Series>,
    rhs: Vec<Series>,
    card: &VectorMatchCardinality,
    matching: Option<&LabelModifier>,
    return_bool: bool,
    n: usize,
) -> Result<Vec<Series>, PromError> {
    // The "one" side is indexed by signature; with group_right the sides swap.
    let swap = matches!(card, VectorMatchCardinality::OneToMany(_));
    let (many, one) = if swap { (rhs, lhs) } else { (lhs, rhs) };
    let include: Vec<String> = card.labels().map(|l| l.labels.clone()).unwrap_or_default();
    let one_to_one = matches!(card, VectorMatchCardinality::OneToOne);
    let comparison = is_comparison(op);

    let one_sigs: Vec<Labels> = one.iter().map(|s| signature(&s.labels, matching)).collect();
    let mut by_sig: HashMap<&Labels, Vec<usize>> = HashMap::new();
    for (i, sig) in one_sigs.iter().enumerate() {
        by_sig.entry(sig).or_default().push(i);
    }

    let mut out: HashMap<Labels, Vec<Option<f64>>> = HashMap::new();
    let mut order: Vec<Labels> = Vec::new();
    let mut many_seen: HashMap<(Labels, usize), Labels> = HashMap::new();
    for m in &many {
        let sig = signature(&m.labels, matching);
        let Some(candidates) = by_sig.get(&sig) else {
            continue;
        };
        for i in 0..n {
            let Some(mv) = m.values[i] else { continue };
            let mut found = candidates.iter().filter(|&&c| one[c].values[i].is_some());
            let Some(&c) = found.next() else { continue };
            if found.next().is_some() {
                return Err(PromError::Execution(format!(
                    "found duplicate series for the match group {} on the {} hand-side of the operation: many-to-many matching not allowed: matching labels must be unique on one side",
                    value::display(&sig),
                    if swap { "left" } else { "right" }
                )));
            }
            if one_to_one
                && let Some(previous) = many_seen.insert((sig.clone(), i), m.labels.clone())
                && previous != m.labels
            {
                return Err(PromError::Execution(format!(
                    "found duplicate series for the match group {} on the {} hand-side of the operation: many-to-many matching not allowed: matching labels must be unique on one side",
                    value::display(&sig),
                    if swap { "right" } else { "left" }
                )));
            }
            let ov = one[c].values[i].unwrap_or(f64::NAN);
            let (a, b) = if swap { (ov, mv) } else { (mv, ov) };
            let Some(mut result) = apply(op, a, b, return_bool) else {
                continue;
            };
            if comparison && !return_bool {
                // A filter keeps the left side's value.
                result = a;
            }
            let mut labels = m.labels.clone();
            if !comparison || return_bool {
                value::remove(&mut labels, METRIC_NAME);
            }
            if one_to_one {
                match matching {
                    Some(LabelModifier::Include(on)) => {
                        labels.retain(|(n, _)| on.labels.iter().any(|l| l == n))
                    }
                    Some(LabelModifier::Exclude(ignoring)) => {
                        labels.retain(|(n, _)| !ignoring.labels.iter().any(|l| l == n))
                    }
                    None => {}
                }
            }
            for name in &include {
                let v = value::get(&one[c].labels, name).unwrap_or("").to_string();
                value::set(&mut labels, name, &v);
            }
            let values = out.entry(labels.clone()).or_insert_with(|| {
                order.push(labels.clone());
                vec![None; n]
            });
            if values[i].is_some() {
                return Err(PromError::Execution(format!(
                    "multiple matches for labels {}: grouping labels must ensure unique matches",
                    value::display(&labels)
                )));
            }
            values[i] = Some(result);
        }
    }
    Ok(order
        .into_iter()
        .filter_map(|labels| {
            let values = out.remove(&labels)?;
            Some(Series { labels, values })
        })
        .collect())
}

/// Fixed series (a test's, a script's) as a source: a selector gets each
/// matching series' samples in `(from, to]`, those with none left out.
#[derive(Debug, Default)]
pub struct FixedSeries(pub Vec<RawSeries>);

#[async_trait::async_trait]
impl Source for FixedSeries {
    async fn select(
        &self,
        selector: &VectorSelector,
        from: i64,
        to: i64,
        _range: Option<i64>,
    ) -> Result<Vec<RawSeries>, PromError> {
        Ok(select_fixed(&self.0, selector, from, to))
    }
}

fn select_fixed(
    series: &[RawSeries],
    selector: &VectorSelector,
    from: i64,
    to: i64,
) -> Vec<RawSeries> {
    fn name_of(s: &RawSeries) -> &str {
        value::get(&s.labels, METRIC_NAME).unwrap_or("")
    }
    let names: Vec<&str> = series
        .iter()
        .map(name_of)
        .filter(|n| !n.is_empty())
        .collect();
    let wanted = selected_names(selector, &names);
    series
        .iter()
        .filter(|s| {
            let n = name_of(s);
            (selector.name.is_none() && n.is_empty() || wanted.contains(&n))
                && matches(&selector.matchers, &s.labels)
        })
        .map(|s| RawSeries {
            labels: s.labels.clone(),
            samples: window(&s.samples, from, to).to_vec(),
        })
        .filter(|s| !s.samples.is_empty())
        .collect()
}

/// Whether `labels` satisfy every matcher (and, with `or`, any group).
pub fn matches(matchers: &Matchers, labels: &Labels) -> bool {
    let all = |ms: &[promql_parser::label::Matcher]| {
        ms.iter()
            .all(|m| m.is_match(value::get(labels, &m.name).unwrap_or("")))
    };
    if matchers.or_matchers.is_empty() {
        all(&matchers.matchers)
    } else {
        matchers.or_matchers.iter().any(|g| all(g))
    }
}

/// The metric names a selector can match: its own, or the values its
/// `__name__` matchers allow among `names`.
pub fn selected_names<'n>(selector: &VectorSelector, names: &[&'n str]) -> Vec<&'n str> {
    names
        .iter()
        .copied()
        .filter(|name| {
            if let Some(n) = &selector.name
                && n != name
            {
                return false;
            }
            let ok = |ms: &[promql_parser::label::Matcher]| {
                ms.iter()
                    .filter(|m| m.name == METRIC_NAME)
                    .all(|m| m.is_match(name))
            };
            if selector.matchers.or_matchers.is_empty() {
                ok(&selector.matchers.matchers)
            } else {
                selector.matchers.or_matchers.iter().any(|g| ok(g))
            }
        })
        .collect()
}

/// Equality matchers on `name` (values a SQL filter can use directly).
pub fn equal_values<'m>(matchers: &'m Matchers, name: &str) -> Option<&'m str> {
    if !matchers.or_matchers.is_empty() {
        return None;
    }
    matchers
        .matchers
        .iter()
        .find(|m| m.name == name && matches!(m.op, MatchOp::Equal) && !m.value.is_empty())
        .map(|m| m.value.as_str())
}
