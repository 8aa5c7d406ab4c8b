//! The evaluator over fixed series: PromQL's semantics, without the store.

use super::PromError;
use super::eval::{Evaluator, FixedSeries};
use super::value::{Labels, RawSeries, Series, Steps, Value, normalize};

fn labels(pairs: &[(&str, &str)]) -> Labels {
    normalize(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// A counter every 10 s from t = 0 to 600 s, rising by `per_step`.
fn counter(pairs: &[(&str, &str)], per_step: f64) -> RawSeries {
    RawSeries {
        labels: labels(pairs),
        samples: (0..=60)
            .map(|i| (i * 10_000, i as f64 * per_step))
            .collect(),
    }
}

fn data() -> FixedSeries {
    let mut series = vec![
        counter(
            &[("__name__", "req_total"), ("svc", "a"), ("code", "200")],
            10.0,
        ),
        counter(
            &[("__name__", "req_total"), ("svc", "a"), ("code", "500")],
            1.0,
        ),
        counter(
            &[("__name__", "req_total"), ("svc", "b"), ("code", "200")],
            5.0,
        ),
        RawSeries {
            labels: labels(&[("__name__", "owner"), ("svc", "a"), ("team", "red")]),
            samples: (0..=60).map(|i| (i * 10_000, 1.0)).collect(),
        },
    ];
    // A histogram: per 10 s, 10 requests ≤ 1, 20 in (1, 5], 10 above 5.
    for (le, per) in [("1", 10.0), ("5", 30.0), ("+Inf", 40.0)] {
        series.push(counter(
            &[("__name__", "lat_bucket"), ("svc", "a"), ("le", le)],
            per,
        ));
    }
    FixedSeries(series)
}

async fn eval_at(expr: &str, t_secs: i64) -> Result<Value, PromError> {
    let source = data();
    let expr = promql_parser::parser::parse(expr).map_err(PromError::BadData)?;
    let steps = Steps::instant(t_secs * 1000);
    let ev = Evaluator {
        source: &source,
        query: steps,
        lookback: 300_000,
    };
    ev.eval(&expr, steps).await
}

/// The instant vector at `t`, as `labels → value`, sorted.
async fn vector(expr: &str, t_secs: i64) -> Vec<(String, f64)> {
    match eval_at(expr, t_secs).await {
        Ok(Value::Vector(series)) => {
            let mut out: Vec<(String, f64)> = series
                .into_iter()
                .filter_map(|Series { labels, values }| {
                    values[0].map(|v| (super::value::display(&labels), v))
                })
                .collect();
            out.sort_by(|a, b| a.0.cmp(&b.0));
            out
        }
        other => panic!("{expr}: expected a vector, got {other:?}"),
    }
}

async fn single(expr: &str, t_secs: i64) -> f64 {
    let v = vector(expr, t_secs).await;
    assert_eq!(v.len(), 1, "{expr}: {v:?}");
    v[0].1
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9 * b.abs().max(1.0)
}

#[tokio::test]
async fn selectors_match_and_look_back() {
    assert_eq!(vector("req_total{svc=\"a\"}", 300).await.len(), 2);
    assert_eq!(vector("req_total{code=~\"5..\"}", 300).await.len(), 1);
    assert_eq!(
        vector("req_total{svc!=\"a\", code!~\"5.*\"}", 300)
            .await
            .len(),
        1
    );
    assert_eq!(single("req_total{svc=\"b\"}", 305).await, 150.0);
    // The last sample is at 600 s; 5 minutes later it is stale.
    assert_eq!(vector("req_total", 899).await.len(), 3);
    assert!(vector("req_total", 901).await.is_empty());
    assert_eq!(single("req_total{svc=\"b\"} offset 1m", 300).await, 120.0);
    assert_eq!(single("req_total{svc=\"b\"} @ 100", 300).await, 50.0);
}

#[tokio::test]
async fn rates_and_aggregations() {
    // 10 per 10 s is 1/s; 1 per 10 s is 0.1/s; 0.5/s for b.
    assert!(close(
        single("rate(req_total{svc=\"a\",code=\"200\"}[1m])", 300).await,
        1.0
    ));
    assert!(close(
        single("increase(req_total{svc=\"b\"}[2m])", 300).await,
        60.0
    ));
    assert!(close(single("sum(rate(req_total[1m]))", 300).await, 1.6));
    let by = vector("sum by (svc) (rate(req_total[1m]))", 300).await;
    assert_eq!(by.len(), 2);
    assert!(close(by[0].1, 1.1) && by[0].0.contains("\"a\""), "{by:?}");
    assert_eq!(
        vector("count without (code) (req_total)", 300).await.len(),
        2
    );
    let top = vector("topk(1, req_total)", 300).await;
    assert!(
        top[0].0.contains("\"200\"") && top[0].0.contains("\"a\""),
        "{top:?}"
    );
    assert!(close(
        single("irate(req_total{svc=\"b\"}[1m])", 300).await,
        0.5
    ));
    assert!(close(
        single("max_over_time(req_total{svc=\"b\"}[1m])", 300).await,
        150.0
    ));
    assert!(close(
        single("avg(req_total)", 300).await,
        (300.0 + 30.0 + 150.0) / 3.0
    ));
    assert!(close(single("quantile(0.5, req_total)", 300).await, 150.0));
}

#[tokio::test]
async fn binary_operators_match_as_prometheus() {
    // Error ratio per service: only `a` has 5xx.
    let ratio = vector(
        "sum by (svc) (rate(req_total{code=~\"5..\"}[1m])) / sum by (svc) (rate(req_total[1m]))",
        300,
    )
    .await;
    assert_eq!(ratio.len(), 1);
    assert!(close(ratio[0].1, 0.1 / 1.1), "{ratio:?}");
    // group_left copies the owner's team onto each request series.
    let joined = vector("req_total * on (svc) group_left (team) owner", 300).await;
    assert_eq!(joined.len(), 2);
    assert!(
        joined.iter().all(|(l, _)| l.contains("team=\"red\"")),
        "{joined:?}"
    );
    // Many-to-many without group_left is an error.
    assert!(eval_at("req_total * on (svc) owner", 300).await.is_err());
    // Comparison filters, `bool` answers 0/1.
    assert_eq!(vector("req_total > 100", 300).await.len(), 2);
    assert_eq!(vector("req_total > bool 100", 300).await.len(), 3);
    assert_eq!(vector("req_total and on (svc) owner", 300).await.len(), 2);
    assert_eq!(
        vector("req_total unless on (svc) owner", 300).await.len(),
        1
    );
    assert_eq!(vector("owner or req_total", 300).await.len(), 4);
    assert!(close(
        single("scalar(owner) * 2 + vector(1)", 300).await,
        3.0
    ));
}

#[tokio::test]
async fn functions_and_subqueries() {
    // Median: rank 20 of 40 in (1, 5], half way: 3.
    let p50 = single(
        "histogram_quantile(0.5, sum by (le) (rate(lat_bucket[1m])))",
        300,
    )
    .await;
    assert!(close(p50, 3.0), "{p50}");
    let sub = single("max_over_time(rate(req_total{svc=\"b\"}[1m])[5m:1m])", 300).await;
    assert!(close(sub, 0.5), "{sub}");
    let replaced = vector(
        "label_replace(owner, \"team_name\", \"team-$1\", \"team\", \"(.*)\")",
        300,
    )
    .await;
    assert!(
        replaced[0].0.contains("team_name=\"team-red\""),
        "{replaced:?}"
    );
    assert_eq!(single("absent(nothing{svc=\"x\"})", 300).await, 1.0);
    assert!(vector("absent(owner)", 300).await.is_empty());
    assert!(close(single("abs(-1 * owner)", 300).await, 1.0));
    assert!(close(
        single("clamp_max(req_total{svc=\"b\"}, 7)", 300).await,
        7.0
    ));
    match eval_at("time()", 300).await {
        Ok(Value::Scalar(v)) => assert_eq!(v, vec![300.0]),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn range_evaluation_gives_a_value_per_step() {
    let source = data();
    let expr = promql_parser::parser::parse("sum(rate(req_total{svc=\"b\"}[1m]))").unwrap();
    let steps = Steps {
        start: 60_000,
        end: 600_000,
        step: 60_000,
    };
    let ev = Evaluator {
        source: &source,
        query: steps,
        lookback: 300_000,
    };
    let Value::Vector(v) = ev.eval(&expr, steps).await.unwrap() else {
        panic!()
    };
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].values.len(), 10);
    assert!(
        v[0].values.iter().all(|x| x.is_some_and(|x| close(x, 0.5))),
        "{v:?}"
    );
}

#[tokio::test]
async fn bad_expressions_are_refused_with_the_reason() {
    let err = eval_at("rate(req_total)", 300)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("matrix"), "{err}");
    let err = eval_at("1 > 2", 300).await.unwrap_err().to_string();
    assert!(err.to_lowercase().contains("bool"), "{err}");
}

#[tokio::test]
async fn nan_is_never_preferred_and_passes_through_clamp() {
    // x * 0 / 0 is a NaN-valued series.
    let nan = vector("req_total{svc=\"b\"} * 0 / 0", 300).await;
    assert!(nan[0].1.is_nan());
    let bottom = vector(
        "bottomk(1, (req_total{svc=\"b\"} * 0 / 0) or req_total{svc=\"a\",code=\"500\"})",
        300,
    )
    .await;
    assert_eq!(bottom.len(), 1);
    assert_eq!(
        bottom[0].1, 30.0,
        "the smallest number, not NaN: {bottom:?}"
    );
    let clamped = vector("clamp_min(req_total{svc=\"b\"} * 0 / 0, 0)", 300).await;
    assert!(clamped[0].1.is_nan(), "{clamped:?}");
}

#[test]
fn out_of_range_numbers_are_bad_expressions_not_panics() {
    let err = super::parse("req_total[1e30]").unwrap_err();
    assert!(matches!(err, PromError::BadData(_)), "{err}");
    assert!(super::parse("sum(rate(req_total[5m]))").is_ok());
}
