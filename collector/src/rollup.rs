//! Rollups kept at ingest: per 10-second window and per key (reporter ×
//! source × destination service / workload / version × route × status ×
//! protocol × flags …), the request and error counts, bytes, a latency
//! sketch, Istio's duration buckets and request / response size buckets
//! (Envoy's default bounds) — what dashboards, PromQL and the
//! policy engine read instead of scanning rows. One-minute windows are
//! merged from the ten-second ones when rows are produced.
//!
//! Rollups are a function of the `requests` rows, kept per WAL segment:
//! every row the WAL commits (or replays) is added to its segment's
//! aggregates, and a flush writes the aggregates of exactly the segments
//! whose rows it writes. So a row counts in a rollup exactly once — also
//! across crashes, restarts and retried batches — and rollups are as
//! durable as the rows. A window spread over several flushes, or a late
//! row, gives a window more than one row for a key: rollup rows add up
//! (sum the counts, merge the sketches).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryBuilder, BooleanBuilder, Int32Builder, Int64Builder,
    ListBuilder, StringDictionaryBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{Int32Type, Int64Type, TimestampMicrosecondType};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use lumen_core::schema::{
    DURATION_BUCKETS_MS, ROLLUP_KEY_NAMES, ROLLUP_WINDOWS, SIZE_BUCKETS, rollups_schema,
};
use lumen_core::sketch::Sketch;

use crate::live::{Counts, Live, LiveKey};

const KEYS: usize = ROLLUP_KEY_NAMES.len();
const BUCKETS: usize = DURATION_BUCKETS_MS.len() + 1;
const SIZES: usize = SIZE_BUCKETS.len() + 1;
const MICROS: i64 = 1_000_000;

/// What a rollup row is keyed by, besides its window.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Key {
    pub(crate) names: [Arc<str>; KEYS],
    pub(crate) status: i32,
    pub(crate) grpc_status: Option<i32>,
    pub(crate) mtls: bool,
}

/// The aggregates of one key in one window.
#[derive(Debug, Clone)]
struct Agg {
    requests: u64,
    errors: u64,
    request_bytes: u64,
    response_bytes: u64,
    duration_sum_us: u64,
    duration_max_us: u64,
    /// Requests per bucket (not cumulative), the last one `+Inf`.
    buckets: [u64; BUCKETS],
    /// Requests per request and response size bucket (not cumulative).
    request_sizes: [u64; SIZES],
    response_sizes: [u64; SIZES],
    sketch: Sketch,
}

impl Default for Agg {
    fn default() -> Self {
        Agg {
            requests: 0,
            errors: 0,
            request_bytes: 0,
            response_bytes: 0,
            duration_sum_us: 0,
            duration_max_us: 0,
            buckets: [0; BUCKETS],
            request_sizes: [0; SIZES],
            response_sizes: [0; SIZES],
            sketch: Sketch::default(),
        }
    }
}

/// Size bucket of a body: the first boundary (bytes) it does not exceed.
fn size_bucket(bytes: u64) -> usize {
    SIZE_BUCKETS
        .iter()
        .position(|b| bytes as f64 <= *b)
        .unwrap_or(SIZES - 1)
}

/// Bucket of a duration: the first boundary (ms) it does not exceed.
fn bucket(duration_us: u64) -> usize {
    let ms = duration_us as f64 / 1000.0;
    DURATION_BUCKETS_MS
        .iter()
        .position(|b| ms <= *b)
        .unwrap_or(BUCKETS - 1)
}

impl Agg {
    fn add(&mut self, error: bool, request_bytes: u64, response_bytes: u64, duration_us: u64) {
        self.requests += 1;
        self.errors += u64::from(error);
        self.request_bytes += request_bytes;
        self.response_bytes += response_bytes;
        self.duration_sum_us += duration_us;
        self.duration_max_us = self.duration_max_us.max(duration_us);
        self.buckets[bucket(duration_us)] += 1;
        self.request_sizes[size_bucket(request_bytes)] += 1;
        self.response_sizes[size_bucket(response_bytes)] += 1;
        self.sketch.add(duration_us);
    }

    /// What the live tier keeps of it.
    fn counts(&self) -> Counts {
        let mut c = [0; 4 + BUCKETS];
        c[..4].copy_from_slice(&[
            self.requests,
            self.request_bytes,
            self.response_bytes,
            self.duration_sum_us,
        ]);
        c[4..].copy_from_slice(&self.buckets);
        c
    }

    fn merge(&mut self, o: &Agg) {
        self.requests += o.requests;
        self.errors += o.errors;
        self.request_bytes += o.request_bytes;
        self.response_bytes += o.response_bytes;
        self.duration_sum_us += o.duration_sum_us;
        self.duration_max_us = self.duration_max_us.max(o.duration_max_us);
        for (a, b) in self.buckets.iter_mut().zip(o.buckets) {
            *a += b;
        }
        for (a, b) in self.request_sizes.iter_mut().zip(o.request_sizes) {
            *a += b;
        }
        for (a, b) in self.response_sizes.iter_mut().zip(o.response_sizes) {
            *a += b;
        }
        self.sketch.merge(&o.sketch);
    }
}

/// A request is an error when it failed on the server side: an HTTP 5xx,
/// a non-OK gRPC status, or no response at all (status 0). A TCP
/// connection has no status: it is an error when the proxy flagged it
/// (no route, upstream failure, …).
fn is_error(status: i32, grpc_status: Option<i32>, tcp: Option<&str>) -> bool {
    match tcp {
        Some(flags) => !flags.is_empty() && flags != "-",
        None => status >= 500 || status == 0 || grpc_status.is_some_and(|g| g != 0),
    }
}

/// The value of key `i` of `row`, from its dictionary.
fn key_value<'a>(
    dicts: &[&'a arrow::array::DictionaryArray<Int32Type>],
    keys: &[i32; KEYS],
    i: usize,
) -> &'a str {
    if keys[i] < 0 {
        return "";
    }
    dicts[i].values().as_string::<i32>().value(keys[i] as usize)
}

/// Rollups of the rows not yet flushed, per WAL segment.
#[derive(Debug, Default)]
pub struct Rollups {
    segments: BTreeMap<u64, HashMap<(i64, Key), Agg>>,
    /// Names shared by all keys, so a key costs pointers, not strings.
    names: HashSet<Arc<str>>,
    guard: CardinalityGuard,
    /// The same rows per second, for the last minutes.
    live: Live<Key>,
}

/// The value a label's excess distinct values are folded into.
pub const OTHER: &str = "other";

/// Default for [`CardinalityGuard`]: distinct values per label per hour.
pub const DEFAULT_MAX_VALUES: usize = 10_000;

/// Bounds the distinct values of each rollup label per hour: past the
/// bound, new values count under [`OTHER`], so one label gone wild (a
/// workload name per pod, a client's random authority) cannot make the
/// rollups — and every dashboard reading them — as large as the rows.
/// The admitted values live in memory: a restart within an hour admits up
/// to the bound again, so an hour's rollups hold at most a few times it.
#[derive(Debug)]
struct CardinalityGuard {
    max_values: usize,
    /// The hour the admitted values are of.
    hour: i64,
    admitted: [HashSet<Arc<str>>; KEYS],
    /// Requests counted under `other`, per label, since the last take.
    folded: [u64; KEYS],
}

impl Default for CardinalityGuard {
    fn default() -> Self {
        CardinalityGuard {
            max_values: DEFAULT_MAX_VALUES,
            hour: i64::MIN,
            admitted: Default::default(),
            folded: [0; KEYS],
        }
    }
}

impl CardinalityGuard {
    /// Whether `value` of label `i` keeps its name in a window starting
    /// at `start` (microseconds).
    fn admit(&mut self, i: usize, value: &Arc<str>, start: i64, requests: u64) -> bool {
        let hour = start.div_euclid(3600 * MICROS);
        if hour > self.hour {
            self.hour = hour;
            for set in &mut self.admitted {
                set.clear();
            }
        }
        let set = &mut self.admitted[i];
        if set.contains(value) || set.len() < self.max_values {
            set.insert(value.clone());
            return true;
        }
        self.folded[i] += requests;
        false
    }
}

impl Rollups {
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Aggregates held (a key in a ten-second window of a segment).
    pub fn len(&self) -> usize {
        self.segments.values().map(HashMap::len).sum()
    }

    /// The per-second tier of the last minutes.
    pub(crate) fn live(&self) -> &Live<Key> {
        &self.live
    }

    pub(crate) fn live_mut(&mut self) -> &mut Live<Key> {
        &mut self.live
    }

    /// Visits the live tier's counts from second `from` on, each key as
    /// its names.
    pub fn live_visit(&self, from: i64, mut f: impl FnMut(i64, LiveKey<'_>, &Counts)) {
        self.live.visit(from, |second, key, counts| {
            let view = LiveKey {
                names: std::array::from_fn(|i| &*key.names[i]),
                status: key.status,
                grpc_status: key.grpc_status,
                mtls: key.mtls,
            };
            f(second, view, counts);
        });
    }

    /// Distinct values each label keeps per hour before the rest become
    /// `other`.
    pub fn set_max_values(&mut self, n: usize) {
        self.guard.max_values = n.max(1);
    }

    /// Requests folded into `other` since the last call, per label.
    pub fn take_folded(&mut self) -> Vec<(&'static str, u64)> {
        let folded = std::mem::replace(&mut self.guard.folded, [0; KEYS]);
        ROLLUP_KEY_NAMES
            .iter()
            .zip(folded)
            .filter(|(_, n)| *n > 0)
            .map(|(l, n)| (*l, n))
            .collect()
    }

    fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.names.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.names.insert(a.clone());
        a
    }

    /// Adds a `requests` batch committed in `segment`. Rows are grouped by
    /// their dictionary keys first, so names are looked up once per group.
    pub fn add(&mut self, segment: u64, batch: &RecordBatch) -> Result<(), ArrowError> {
        let col = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| ArrowError::SchemaError(format!("no `{name}` column")))
        };
        let time = col("time")?.as_primitive::<TimestampMicrosecondType>();
        let mut dicts = Vec::with_capacity(KEYS);
        for name in ROLLUP_KEY_NAMES {
            dicts.push(col(name)?.as_dictionary::<Int32Type>());
        }
        let status = col("status")?.as_primitive::<Int32Type>();
        let grpc = col("grpc_status")?.as_primitive::<Int32Type>();
        let mtls = col("mtls")?.as_boolean();
        let req_bytes = col("request_bytes")?.as_primitive::<Int64Type>();
        let resp_bytes = col("response_bytes")?.as_primitive::<Int64Type>();
        let duration = col("duration_us")?.as_primitive::<Int64Type>();

        type Local = (i64, [i32; KEYS], i32, Option<i32>, bool);
        // Grouped per second, for the live tier; the rollups' windows
        // merge the seconds.
        let mut groups: HashMap<Local, Agg> = HashMap::new();
        let window = ROLLUP_WINDOWS[0] * MICROS;
        let position = |name: &str| ROLLUP_KEY_NAMES.iter().position(|n| *n == name);
        let (protocol, flags) = (position("protocol"), position("response_flags"));
        for row in 0..batch.num_rows() {
            let mut keys = [0i32; KEYS];
            for (k, d) in keys.iter_mut().zip(&dicts) {
                *k = if d.is_null(row) {
                    -1
                } else {
                    d.keys().value(row)
                };
            }
            let g = (!grpc.is_null(row)).then(|| grpc.value(row));
            let s = status.value(row);
            let local = (
                time.value(row).div_euclid(MICROS),
                keys,
                s,
                g,
                mtls.value(row),
            );
            let tcp = match (protocol, flags) {
                (Some(p), Some(f)) if key_value(&dicts, &keys, p) == "tcp" => {
                    Some(key_value(&dicts, &keys, f))
                }
                _ => None,
            };
            groups.entry(local).or_default().add(
                is_error(s, g, tcp),
                req_bytes.value(row).max(0) as u64,
                resp_bytes.value(row).max(0) as u64,
                duration.value(row).max(0) as u64,
            );
        }
        // In the batch's order of first appearance (dictionary keys are
        // given in it), so the cardinality guard admits the same values
        // when the WAL replays the batch.
        let mut groups: Vec<(Local, Agg)> = groups.into_iter().collect();
        groups.sort_unstable_by_key(|(k, _)| *k);
        let mut resolved = Vec::with_capacity(groups.len());
        for ((second, keys, s, g, m), agg) in groups {
            let start = (second * MICROS).div_euclid(window) * window;
            let mut names: [Arc<str>; KEYS] = Default::default();
            for (i, (name, d)) in names.iter_mut().zip(&dicts).enumerate() {
                let value = if keys[i] < 0 {
                    ""
                } else {
                    d.values().as_string::<i32>().value(keys[i] as usize)
                };
                let interned = self.intern(value);
                *name = if self.guard.admit(i, &interned, start, agg.requests) {
                    interned
                } else {
                    self.intern(OTHER)
                };
            }
            let key = Key {
                names,
                status: s,
                grpc_status: g,
                mtls: m,
            };
            self.live.add(second, &key, &agg.counts());
            resolved.push(((start, key), agg));
        }
        let aggs = self.segments.entry(segment).or_default();
        for (k, agg) in resolved {
            aggs.entry(k).or_default().merge(&agg);
        }
        Ok(())
    }

    /// Rows for segments up to `segment` (for a flush) or all (`u64::MAX`,
    /// for queries): one per window length, window and key.
    pub fn batch_through(&self, segment: u64) -> Result<Option<RecordBatch>, ArrowError> {
        let mut merged: BTreeMap<(i64, i64, &Key), Agg> = BTreeMap::new();
        for (_, aggs) in self.segments.range(..=segment) {
            for ((start, key), agg) in aggs {
                for w in ROLLUP_WINDOWS {
                    let len = w * MICROS;
                    merged
                        .entry((start.div_euclid(len) * len, w, key))
                        .or_default()
                        .merge(agg);
                }
            }
        }
        if merged.is_empty() {
            return Ok(None);
        }
        build(merged.iter().map(|((t, w, k), a)| (*t, *w, *k, a))).map(Some)
    }

    /// Forgets segments up to `segment`, once their rollups are in Parquet.
    pub fn remove_through(&mut self, segment: u64) {
        self.segments = self.segments.split_off(&(segment + 1));
        // Names no remaining key uses (a workload gone since) are let go.
        self.names.retain(|n| Arc::strong_count(n) > 1);
    }
}

type DictBuilder = StringDictionaryBuilder<Int32Type>;

fn build<'a>(
    rows: impl Iterator<Item = (i64, i64, &'a Key, &'a Agg)>,
) -> Result<RecordBatch, ArrowError> {
    let mut time = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    let mut window = Int32Builder::new();
    let mut names: Vec<DictBuilder> = (0..KEYS).map(|_| DictBuilder::new()).collect();
    let mut status = Int32Builder::new();
    let mut grpc = Int32Builder::new();
    let mut mtls = BooleanBuilder::new();
    let mut ints: [Int64Builder; 6] = Default::default();
    let mut sketch = BinaryBuilder::new();
    let list = || {
        ListBuilder::new(Int64Builder::new()).with_field(Arc::new(
            arrow::datatypes::Field::new_list_field(arrow::datatypes::DataType::Int64, false),
        ))
    };
    let (mut buckets, mut request_sizes, mut response_sizes) = (list(), list(), list());
    let mut encoded = Vec::new();
    for (start, w, key, a) in rows {
        time.append_value(start);
        window.append_value(w as i32);
        for (b, n) in names.iter_mut().zip(&key.names) {
            b.append_value(n);
        }
        status.append_value(key.status);
        grpc.append_option(key.grpc_status);
        mtls.append_value(key.mtls);
        let values = [
            a.requests,
            a.errors,
            a.request_bytes,
            a.response_bytes,
            a.duration_sum_us,
            a.duration_max_us,
        ];
        for (b, v) in ints.iter_mut().zip(values) {
            b.append_value(v as i64);
        }
        encoded.clear();
        a.sketch.encode(&mut encoded);
        sketch.append_value(&encoded);
        // Cumulative, as Prometheus histograms are.
        for (list, counts) in [
            (&mut buckets, &a.buckets[..]),
            (&mut request_sizes, &a.request_sizes[..]),
            (&mut response_sizes, &a.response_sizes[..]),
        ] {
            let mut total = 0u64;
            for n in counts {
                total += n;
                list.values().append_value(total as i64);
            }
            list.append(true);
        }
    }
    let mut columns: Vec<ArrayRef> = vec![Arc::new(time.finish()), Arc::new(window.finish())];
    columns.extend(names.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    columns.push(Arc::new(status.finish()));
    columns.push(Arc::new(grpc.finish()));
    columns.push(Arc::new(mtls.finish()));
    columns.extend(ints.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    columns.push(Arc::new(sketch.finish()));
    columns.push(Arc::new(buckets.finish()));
    columns.push(Arc::new(request_sizes.finish()));
    columns.push(Arc::new(response_sizes.finish()));
    RecordBatch::try_new(rollups_schema(), columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lumen_core::RequestRecord;
    use lumen_core::schema::RequestBatchBuilder;
    use std::time::{Duration, SystemTime};

    fn at(secs: u64, status: u16, micros: u64) -> RequestRecord {
        RequestRecord {
            start_time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs),
            status,
            duration: Duration::from_micros(micros),
            response_bytes: 10,
            ..RequestRecord::example()
        }
    }

    fn batch(records: &[RequestRecord]) -> RecordBatch {
        let mut b = RequestBatchBuilder::new();
        for r in records {
            b.push(r);
        }
        b.finish().unwrap()
    }

    fn column_i64(b: &RecordBatch, name: &str) -> Vec<i64> {
        b.column_by_name(name)
            .unwrap()
            .as_primitive::<Int64Type>()
            .values()
            .to_vec()
    }

    #[test]
    fn tcp_connections_are_errors_only_when_flagged() {
        assert!(!is_error(0, None, Some("-")));
        assert!(is_error(0, None, Some("UF")));
        assert!(is_error(0, None, None), "an HTTP request with no answer");
        assert!(is_error(503, None, None) && !is_error(404, None, None));
    }

    #[test]
    fn rows_are_counted_per_window_and_key_and_minutes_merge_tens() {
        let mut r = Rollups::default();
        // Two 10 s windows of one minute; one error; a second key (404).
        r.add(
            1,
            &batch(&[at(1, 200, 400), at(2, 503, 2_000), at(3, 404, 30)]),
        )
        .unwrap();
        r.add(2, &batch(&[at(12, 200, 700_000)])).unwrap();
        let b = r.batch_through(u64::MAX).unwrap().unwrap();
        // 10 s: (w0, 200), (w0, 503), (w0, 404), (w1, 200); 60 s: 200, 503, 404.
        assert_eq!(b.num_rows(), 7);
        assert_eq!(column_i64(&b, "requests").iter().sum::<i64>(), 8);
        assert_eq!(column_i64(&b, "errors").iter().sum::<i64>(), 2);
        let windows = b
            .column_by_name("window_seconds")
            .unwrap()
            .as_primitive::<Int32Type>();
        let status = b
            .column_by_name("status")
            .unwrap()
            .as_primitive::<Int32Type>();
        let requests = column_i64(&b, "requests");
        let minute_200 = (0..b.num_rows())
            .find(|&i| windows.value(i) == 60 && status.value(i) == 200)
            .unwrap();
        assert_eq!(requests[minute_200], 2);
        let sketch = b
            .column_by_name("duration_sketch")
            .unwrap()
            .as_binary::<i32>();
        let s = Sketch::decode(sketch.value(minute_200)).unwrap();
        assert_eq!(s.count(), 2);
        // Cumulative buckets: 0.4 ms ≤ 0.5 ms, 700 ms ≤ 1000 ms.
        let buckets = b
            .column_by_name("duration_bucket")
            .unwrap()
            .as_list::<i32>();
        let le = buckets.value(minute_200);
        let le = le.as_primitive::<Int64Type>();
        assert_eq!(le.len(), BUCKETS);
        assert_eq!(
            (le.value(0), le.value(8), le.value(9), le.value(BUCKETS - 1)),
            (1, 1, 2, 2)
        );
        // Size buckets too: empty requests ≤ 0.5 bytes, 10-byte responses
        // ≤ 10 bytes.
        let sizes = |name: &str| -> Vec<i64> {
            let l = b.column_by_name(name).unwrap().as_list::<i32>();
            l.value(minute_200)
                .as_primitive::<Int64Type>()
                .values()
                .to_vec()
        };
        let request = sizes("request_bytes_bucket");
        assert_eq!(request.len(), SIZES);
        assert!(request.iter().all(|&n| n == 2), "{request:?}");
        let response = sizes("response_bytes_bucket");
        assert_eq!((response[2], response[3], response[SIZES - 1]), (0, 2, 2));

        // A flush of segment 1 takes its rows only; the rest stays.
        let flushed = r.batch_through(1).unwrap().unwrap();
        assert_eq!(column_i64(&flushed, "requests").iter().sum::<i64>(), 6);
        r.remove_through(1);
        let rest = r.batch_through(u64::MAX).unwrap().unwrap();
        assert_eq!(column_i64(&rest, "requests").iter().sum::<i64>(), 2);
    }

    #[test]
    fn a_label_past_its_distinct_values_counts_the_rest_as_other() {
        let mut r = Rollups::default();
        r.set_max_values(2);
        let records: Vec<RequestRecord> = ["a", "b", "c", "d", "a"]
            .iter()
            .map(|service| {
                let mut rec = at(1, 200, 100);
                rec.destination.service = (*service).into();
                rec
            })
            .collect();
        r.add(1, &batch(&records)).unwrap();
        let rows = r.batch_through(u64::MAX).unwrap().unwrap();
        let services = arrow::compute::cast(
            rows.column_by_name("destination_service").unwrap(),
            &arrow::datatypes::DataType::Utf8,
        )
        .unwrap();
        let services = services.as_string::<i32>();
        let windows = rows
            .column_by_name("window_seconds")
            .unwrap()
            .as_primitive::<Int32Type>();
        let requests = column_i64(&rows, "requests");
        let mut per_service: BTreeMap<&str, i64> = BTreeMap::new();
        for (i, n) in requests.iter().enumerate() {
            if windows.value(i) == 10 {
                *per_service.entry(services.value(i)).or_default() += n;
            }
        }
        assert_eq!(per_service.values().sum::<i64>(), 5, "no request lost");
        assert_eq!(per_service.len(), 3, "two names and other: {per_service:?}");
        assert_eq!(per_service.get(OTHER), Some(&2));
        assert_eq!(r.take_folded(), vec![("destination_service", 2)]);
        assert!(r.take_folded().is_empty(), "taken");
    }
}
