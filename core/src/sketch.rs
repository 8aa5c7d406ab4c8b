//! A mergeable latency sketch: DDSketch (Masson, Rim & Lee, VLDB 2019) with
//! a relative accuracy of 1 %.
//!
//! Values (durations in µs) fall into logarithmic buckets `γ^(i-1) < v ≤ γ^i`
//! with `γ = (1 + α) / (1 − α)`; a quantile is answered with the bucket's
//! midpoint `2γ^i / (γ + 1)`, which is within `α` of every value in the
//! bucket. So any quantile read from a sketch — or from sketches merged by
//! adding their bucket counts — is within 1 % of the value at that rank.
//! Rollups keep one per key and window; SQL reads them through
//! `sketch_quantile` and `sketch_merge`.
//!
//! Encoded form: `[u8 version = 1][varint zero count][varint bucket count]`
//! then per bucket, ascending, `[zigzag varint index delta][varint count]`.

use std::collections::BTreeMap;
use std::sync::LazyLock;

/// Relative accuracy `α` of every quantile.
pub const RELATIVE_ACCURACY: f64 = 0.01;

static GAMMA: LazyLock<f64> =
    LazyLock::new(|| (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY));
static LN_GAMMA: LazyLock<f64> = LazyLock::new(|| GAMMA.ln());

const VERSION: u8 = 1;

/// Counts of values per logarithmic bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sketch {
    /// Values of 0 (below the first bucket).
    zeros: u64,
    buckets: BTreeMap<i32, u64>,
}

/// Why bytes are not a sketch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a Lumen latency sketch: {0}")]
pub struct SketchError(&'static str);

fn index(v: f64) -> i32 {
    (v.ln() / *LN_GAMMA).ceil() as i32
}

impl Sketch {
    pub fn new() -> Self {
        Sketch::default()
    }

    pub fn add(&mut self, v: u64) {
        self.add_n(v, 1);
    }

    pub fn add_n(&mut self, v: u64, n: u64) {
        if v == 0 {
            self.zeros += n;
        } else {
            *self.buckets.entry(index(v as f64)).or_insert(0) += n;
        }
    }

    /// Adds `other`'s values, as if they had been added here.
    pub fn merge(&mut self, other: &Sketch) {
        self.zeros += other.zeros;
        for (i, n) in &other.buckets {
            *self.buckets.entry(*i).or_insert(0) += n;
        }
    }

    pub fn count(&self) -> u64 {
        self.zeros + self.buckets.values().sum::<u64>()
    }

    pub fn is_empty(&self) -> bool {
        self.count() == 0
    }

    /// Buckets in use: what the sketch's memory grows with (at most a few
    /// hundred for latencies from a microsecond to an hour).
    pub fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    /// The value at quantile `q` (0 ≤ q ≤ 1), within [`RELATIVE_ACCURACY`]
    /// of the exact one; `None` for an empty sketch or a `q` out of range.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if !(0.0..=1.0).contains(&q) {
            return None;
        }
        let count = self.count();
        if count == 0 {
            return None;
        }
        // The rank of the value, as the lower of the two nearest-rank
        // conventions: q = 0.5 of [1, 2] is 1.
        let rank = (q * (count - 1) as f64).floor() as u64;
        if rank < self.zeros {
            return Some(0.0);
        }
        let mut seen = self.zeros;
        for (i, n) in &self.buckets {
            seen += n;
            if seen > rank {
                return Some(2.0 * GAMMA.powi(*i) / (*GAMMA + 1.0));
            }
        }
        None
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(VERSION);
        put_varint(out, self.zeros);
        put_varint(out, self.buckets.len() as u64);
        let mut prev = 0i64;
        for (i, n) in &self.buckets {
            let delta = i64::from(*i) - prev;
            put_varint(out, ((delta << 1) ^ (delta >> 63)) as u64);
            put_varint(out, *n);
            prev = i64::from(*i);
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 3 * self.buckets.len());
        self.encode(&mut out);
        out
    }

    pub fn decode(mut data: &[u8]) -> Result<Sketch, SketchError> {
        let (&version, rest) = data.split_first().ok_or(SketchError("empty"))?;
        if version != VERSION {
            return Err(SketchError("unknown version"));
        }
        data = rest;
        let zeros = get_varint(&mut data)?;
        let n = get_varint(&mut data)?;
        let mut buckets = BTreeMap::new();
        let mut prev = 0i64;
        for _ in 0..n {
            let z = get_varint(&mut data)?;
            let delta = ((z >> 1) as i64) ^ -((z & 1) as i64);
            let i = prev + delta;
            let i = i32::try_from(i).map_err(|_| SketchError("bucket index out of range"))?;
            buckets.insert(i, get_varint(&mut data)?);
            prev = i64::from(i);
        }
        if !data.is_empty() {
            return Err(SketchError("trailing bytes"));
        }
        Ok(Sketch { zeros, buckets })
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(data: &mut &[u8]) -> Result<u64, SketchError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = data.split_first().ok_or(SketchError("truncated"))?;
        *data = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(SketchError("varint too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(sorted: &[u64], q: f64) -> f64 {
        sorted[(q * (sorted.len() - 1) as f64).floor() as usize] as f64
    }

    #[test]
    fn quantiles_are_within_the_relative_accuracy_also_after_merging() {
        // Latencies spread over five orders of magnitude, in two halves.
        let values: Vec<u64> = (0..20_000)
            .map(|i: u64| {
                let x = (i.wrapping_mul(2654435761) % 100_000) as f64 / 100_000.0;
                (10.0 * 10f64.powf(5.0 * x)) as u64
            })
            .collect();
        let (mut a, mut b) = (Sketch::new(), Sketch::new());
        for (i, v) in values.iter().enumerate() {
            if i % 2 == 0 { a.add(*v) } else { b.add(*v) }
        }
        a.merge(&b);
        let mut sorted = values.clone();
        sorted.sort_unstable();
        assert_eq!(a.count(), sorted.len() as u64);
        for q in [0.0, 0.1, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0] {
            let (got, want) = (a.quantile(q).unwrap(), exact(&sorted, q));
            assert!(
                (got - want).abs() <= RELATIVE_ACCURACY * want + 1e-9,
                "q={q}: sketch {got}, exact {want}"
            );
        }
        assert_eq!(a.quantile(1.5), None);
        assert_eq!(Sketch::new().quantile(0.5), None);
    }

    #[test]
    fn encoding_round_trips_and_rejects_garbage() {
        let mut s = Sketch::new();
        for v in [0, 0, 1, 7, 7, 900, 1_000_000] {
            s.add(v);
        }
        let bytes = s.to_bytes();
        assert_eq!(Sketch::decode(&bytes).unwrap(), s);
        assert!(bytes.len() < 20, "{} bytes", bytes.len());
        assert!(Sketch::decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(Sketch::decode(&[9, 0, 0]).is_err());
        assert!(Sketch::decode(&[]).is_err());
        assert_eq!(s.quantile(0.0), Some(0.0));
    }
}
