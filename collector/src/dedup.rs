//! Recognising a batch stored before: exactly-once ingest for producers
//! that number their batches.
//!
//! A Lumen proxy names every batch it exports with its instance id and a
//! sequence number, and retries with the same id when an acknowledgement
//! is lost. The WAL writer asks [`Dedup`] before writing a batch; a batch
//! already stored is acknowledged again without being written twice. The
//! state lives in the WAL itself — every entry of a numbered batch carries
//! its id, and every segment opens with a snapshot of the state — so it
//! survives restarts and the deletion of flushed segments.
//!
//! Per producer it keeps the highest sequence stored and which of the
//! [`WINDOW`] sequences below it were stored, so batches that overtake one
//! another (pipelined exports) are still told apart. A sequence older than
//! the window counts as stored: a producer retries for seconds, not for
//! [`WINDOW`] batches.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Sequences below the highest stored whose fate is remembered exactly.
pub const WINDOW: u64 = 128;

/// Producers silent this long are forgotten: far longer than any producer
/// keeps retrying a batch.
pub const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// Most producers remembered; past it the longest silent are forgotten.
const MAX_PRODUCERS: usize = 100_000;

/// A producer's name for one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchId {
    /// Random per producer instance (a proxy's start).
    pub producer: [u8; 16],
    /// Increases by one per batch the producer makes.
    pub seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Producer {
    max_seq: u64,
    /// Bit `i` set: `max_seq - i` was stored (bit 0 is `max_seq` itself).
    stored: u128,
    /// Unix milliseconds of the last batch stored.
    last_seen_ms: u64,
}

/// What has been stored, per producer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dedup {
    producers: HashMap<[u8; 16], Producer>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Dedup {
    /// Whether `id` was stored already.
    pub fn contains(&self, id: &BatchId) -> bool {
        let Some(p) = self.producers.get(&id.producer) else {
            return false;
        };
        if id.seq > p.max_seq {
            return false;
        }
        let back = p.max_seq - id.seq;
        back >= WINDOW || p.stored & (1 << back) != 0
    }

    /// Records `id` as stored.
    pub fn insert(&mut self, id: &BatchId) {
        self.insert_at(id, now_ms());
    }

    fn insert_at(&mut self, id: &BatchId, seen_ms: u64) {
        let p = self.producers.entry(id.producer).or_insert(Producer {
            max_seq: id.seq,
            stored: 0,
            last_seen_ms: seen_ms,
        });
        if id.seq > p.max_seq {
            let shift = id.seq - p.max_seq;
            p.stored = if shift >= WINDOW {
                0
            } else {
                p.stored << shift
            };
            p.max_seq = id.seq;
        }
        let back = p.max_seq - id.seq;
        if back < WINDOW {
            p.stored |= 1 << back;
        }
        p.last_seen_ms = p.last_seen_ms.max(seen_ms);
    }

    /// Folds in a snapshot read from the WAL.
    pub fn merge(&mut self, other: Dedup) {
        for (producer, q) in other.producers {
            match self.producers.get_mut(&producer) {
                None => {
                    self.producers.insert(producer, q);
                }
                Some(p) => {
                    let (hi, lo) = if p.max_seq >= q.max_seq {
                        (*p, q)
                    } else {
                        (q, *p)
                    };
                    let shift = hi.max_seq - lo.max_seq;
                    let lo_bits = if shift >= WINDOW {
                        0
                    } else {
                        lo.stored << shift
                    };
                    *p = Producer {
                        max_seq: hi.max_seq,
                        stored: hi.stored | lo_bits,
                        last_seen_ms: hi.last_seen_ms.max(lo.last_seen_ms),
                    };
                }
            }
        }
    }

    /// Forgets producers silent for [`FORGET_AFTER`], and the longest
    /// silent past [`MAX_PRODUCERS`].
    pub fn prune(&mut self) {
        let cutoff = now_ms().saturating_sub(FORGET_AFTER.as_millis() as u64);
        self.producers.retain(|_, p| p.last_seen_ms >= cutoff);
        if self.producers.len() > MAX_PRODUCERS {
            let mut seen: Vec<u64> = self.producers.values().map(|p| p.last_seen_ms).collect();
            seen.sort_unstable();
            let keep_from = seen[seen.len() - MAX_PRODUCERS];
            self.producers.retain(|_, p| p.last_seen_ms >= keep_from);
        }
    }

    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// `[u32 count][count × (producer 16, max_seq 8, stored 16, last_seen_ms 8)]`, little-endian.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.producers.len() as u32).to_le_bytes());
        for (producer, p) in &self.producers {
            out.extend_from_slice(producer);
            out.extend_from_slice(&p.max_seq.to_le_bytes());
            out.extend_from_slice(&p.stored.to_le_bytes());
            out.extend_from_slice(&p.last_seen_ms.to_le_bytes());
        }
    }

    /// Reads what [`encode`](Self::encode) wrote; `None` if it is malformed.
    pub fn decode(data: &[u8]) -> Option<Dedup> {
        let count = u32::from_le_bytes(data.get(..4)?.try_into().ok()?) as usize;
        const ENTRY: usize = 16 + 8 + 16 + 8;
        let body = data.get(4..)?;
        if body.len() != count.checked_mul(ENTRY)? {
            return None;
        }
        let mut producers = HashMap::with_capacity(count);
        for e in body.chunks_exact(ENTRY) {
            let producer: [u8; 16] = e[..16].try_into().ok()?;
            producers.insert(
                producer,
                Producer {
                    max_seq: u64::from_le_bytes(e[16..24].try_into().ok()?),
                    stored: u128::from_le_bytes(e[24..40].try_into().ok()?),
                    last_seen_ms: u64::from_le_bytes(e[40..48].try_into().ok()?),
                },
            );
        }
        Some(Dedup { producers })
    }
}

impl BatchId {
    pub const ENCODED_LEN: usize = 24;

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.producer);
        out.extend_from_slice(&self.seq.to_le_bytes());
    }

    pub fn decode(data: &[u8]) -> Option<BatchId> {
        Some(BatchId {
            producer: data.get(..16)?.try_into().ok()?,
            seq: u64::from_le_bytes(data.get(16..24)?.try_into().ok()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(p: u8, seq: u64) -> BatchId {
        BatchId {
            producer: [p; 16],
            seq,
        }
    }

    #[test]
    fn stored_batches_are_recognised_also_out_of_order() {
        let mut d = Dedup::default();
        assert!(!d.contains(&id(1, 5)));
        d.insert(&id(1, 5));
        assert!(d.contains(&id(1, 5)));
        assert!(!d.contains(&id(2, 5)), "producers are apart");
        // 7 overtakes 6: 6 is still new, and once stored, known.
        d.insert(&id(1, 7));
        assert!(!d.contains(&id(1, 6)));
        d.insert(&id(1, 6));
        assert!(d.contains(&id(1, 6)) && d.contains(&id(1, 7)));
        assert!(!d.contains(&id(1, 8)));
        // Far past the window, old sequences count as stored.
        d.insert(&id(1, 7 + WINDOW + 10));
        assert!(d.contains(&id(1, 7)));
        assert!(!d.contains(&id(1, 7 + WINDOW + 9)));
    }

    #[test]
    fn snapshots_round_trip_and_merge() {
        let mut a = Dedup::default();
        a.insert(&id(1, 3));
        a.insert(&id(2, 10));
        let mut buf = Vec::new();
        a.encode(&mut buf);
        let b = Dedup::decode(&buf).unwrap();
        assert_eq!(a, b);
        assert!(Dedup::decode(&buf[..buf.len() - 1]).is_none());

        let mut later = Dedup::default();
        later.insert(&id(1, 4));
        let mut merged = b.clone();
        merged.merge(later);
        assert!(merged.contains(&id(1, 3)) && merged.contains(&id(1, 4)));
        assert!(merged.contains(&id(2, 10)));
        assert!(!merged.contains(&id(1, 2)));

        let mut bid = Vec::new();
        id(9, 77).encode(&mut bid);
        assert_eq!(BatchId::decode(&bid), Some(id(9, 77)));
    }

    #[test]
    fn silent_producers_are_forgotten() {
        let mut d = Dedup::default();
        d.insert_at(&id(1, 1), 0);
        d.insert(&id(2, 1));
        d.prune();
        assert!(!d.contains(&id(1, 1)));
        assert!(d.contains(&id(2, 1)));
    }
}
