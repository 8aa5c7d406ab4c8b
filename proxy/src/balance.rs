//! Load balancing: which endpoint of a cluster gets the next try. One
//! [`Balancer`] per cluster serves HTTP, tunnels and TCP alike; the cluster
//! says which endpoints are eligible (healthy, in the best locality, not
//! tried yet) and the balancer chooses among them.

use std::sync::atomic::{AtomicUsize, Ordering};

use lumen_core::networking::HashRing;
use lumen_core::networking::destination_rule::Algorithm;

/// How a cluster chooses, with the state its algorithm keeps.
#[derive(Debug)]
pub enum Balancer {
    RoundRobin(AtomicUsize),
    Random,
    /// Power of two choices by requests in flight.
    LeastRequest,
    /// Power of two choices by latency average × load (Linkerd's peak EWMA).
    LeastLatency,
    /// A ring of `(point, endpoint)`, sorted by point.
    RingHash(Vec<(u64, u32)>),
    /// Maglev's lookup table: slot → endpoint.
    Maglev(Vec<u32>),
}

/// What the balancer may look at for one pick.
pub struct Candidates<'a> {
    pub len: usize,
    pub eligible: &'a dyn Fn(usize) -> bool,
    /// Requests in flight (least request) or latency cost (least latency).
    pub cost: &'a dyn Fn(usize) -> f64,
    /// The request's hash, for consistent hashing.
    pub hash: Option<u64>,
}

impl Balancer {
    /// A balancer for `keys` (one stable key per endpoint, its address).
    pub fn new(algorithm: &Algorithm, keys: &[&str]) -> Self {
        match algorithm {
            Algorithm::RoundRobin => {
                Balancer::RoundRobin(AtomicUsize::new(rand::random_range(0..keys.len().max(1))))
            }
            Algorithm::Random => Balancer::Random,
            Algorithm::LeastRequest => Balancer::LeastRequest,
            Algorithm::LeastLatency => Balancer::LeastLatency,
            Algorithm::ConsistentHash(ch) => match ch.ring {
                HashRing::RingHash { minimum_ring_size } => {
                    Balancer::RingHash(ring(keys, minimum_ring_size))
                }
                HashRing::Maglev { table_size } => Balancer::Maglev(maglev(keys, table_size)),
            },
        }
    }

    pub fn pick(&self, c: &Candidates<'_>) -> Option<usize> {
        // Endpoints are found by rank among the eligible, so a pick
        // allocates nothing.
        let count = (0..c.len).filter(|&i| (c.eligible)(i)).count();
        let nth = |k: usize| (0..c.len).filter(|&i| (c.eligible)(i)).nth(k);
        let any = || nth(rand::random_range(0..count));
        if count <= 1 {
            return nth(0);
        }
        match self {
            Balancer::RoundRobin(next) => {
                // The cursor walks the whole list, so skipping an ineligible
                // endpoint does not send its share to the next one twice.
                for _ in 0..c.len {
                    let i = next.fetch_add(1, Ordering::Relaxed) % c.len;
                    if (c.eligible)(i) {
                        return Some(i);
                    }
                }
                nth(0)
            }
            Balancer::Random => any(),
            Balancer::LeastRequest | Balancer::LeastLatency => {
                let a = rand::random_range(0..count);
                let mut b = rand::random_range(0..count - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (nth(a)?, nth(b)?);
                Some(if (c.cost)(b) < (c.cost)(a) { b } else { a })
            }
            Balancer::RingHash(points) => {
                let Some(h) = c.hash else {
                    return any();
                };
                let start = points.partition_point(|(p, _)| *p < h);
                // The next point clockwise whose endpoint may take it: an
                // endpoint that is out moves only its own keys.
                (0..points.len())
                    .map(|k| points[(start + k) % points.len()].1 as usize)
                    .find(|&i| (c.eligible)(i))
            }
            Balancer::Maglev(table) => {
                let Some(h) = c.hash else {
                    return any();
                };
                let m = table.len();
                (0..m)
                    .map(|k| {
                        table[((h as usize).wrapping_add(k.wrapping_mul(0x9E37))) % m] as usize
                    })
                    .find(|&i| (c.eligible)(i))
            }
        }
    }
}

/// xxHash64 with seed 0, as Envoy hashes consistent-hash keys: the same
/// in every process, so every sidecar sends a key to one endpoint.
pub fn hash64(bytes: &[u8]) -> u64 {
    twox_hash::XxHash64::oneshot(0, bytes)
}

/// A ring hash of at least `minimum_size` points. Envoy gives each
/// endpoint `ceil(size / n)` points, so every endpoint's points change when
/// one leaves and keys move between endpoints that stayed; here each gets
/// the same number whatever `n` (up to 1024, more only when the minimum
/// needs it), so only the leaver's keys move.
fn ring(keys: &[&str], minimum_size: u64) -> Vec<(u64, u32)> {
    if keys.is_empty() {
        return Vec::new();
    }
    let per = minimum_size
        .min(1024)
        .max(minimum_size.div_ceil(keys.len() as u64))
        .max(1);
    let mut points = Vec::with_capacity((per as usize) * keys.len());
    for (i, k) in keys.iter().enumerate() {
        for r in 0..per {
            points.push((hash64(format!("{k}_{r}").as_bytes()), i as u32));
        }
    }
    points.sort_unstable();
    points
}

/// Maglev's table (Eisenbud et al., 2016): each endpoint fills slots in its
/// own permutation, in turns, until the table is full.
fn maglev(keys: &[&str], size: u64) -> Vec<u32> {
    let m = size as usize;
    if keys.is_empty() {
        return Vec::new();
    }
    let perms: Vec<(usize, usize)> = keys
        .iter()
        .map(|k| {
            let offset = (hash64(k.as_bytes()) % size) as usize;
            let skip = (hash64(format!("{k}#skip").as_bytes()) % (size - 1)) as usize + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0usize; keys.len()];
    let mut table = vec![u32::MAX; m];
    let mut filled = 0;
    while filled < m {
        for (i, &(offset, skip)) in perms.iter().enumerate() {
            let mut c = (offset + next[i] * skip) % m;
            while table[c] != u32::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            table[c] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use lumen_core::networking::{ConsistentHash, HashKey};

    fn pick_all(b: &Balancer, n: usize, out: &[usize], hash: Option<u64>) -> Option<usize> {
        let eligible = |i: usize| !out.contains(&i);
        let cost = |i: usize| i as f64;
        b.pick(&Candidates {
            len: n,
            eligible: &eligible,
            cost: &cost,
            hash,
        })
    }

    #[test]
    fn round_robin_rotates_and_skips_the_ineligible() {
        let b = Balancer::RoundRobin(AtomicUsize::new(0));
        let picks: Vec<usize> = (0..6)
            .map(|_| pick_all(&b, 3, &[], None).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        let picks: Vec<usize> = (0..4)
            .map(|_| pick_all(&b, 3, &[1], None).unwrap())
            .collect();
        assert!(!picks.contains(&1));
        assert_eq!(pick_all(&b, 3, &[0, 1, 2], None), None);
    }

    #[test]
    fn two_choices_prefer_the_cheaper() {
        let b = Balancer::LeastRequest;
        // With two endpoints both are always compared: the cheaper wins.
        for _ in 0..20 {
            assert_eq!(pick_all(&b, 2, &[], None), Some(0));
        }
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:9080")).collect()
    }

    fn moved_share(ring: HashRing) -> f64 {
        let algorithm = Algorithm::ConsistentHash(ConsistentHash {
            key: HashKey::SourceIp,
            ring,
        });
        let five = keys(5);
        let four: Vec<String> = five[..4].to_vec();
        let b5 = Balancer::new(
            &algorithm,
            &five.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let b4 = Balancer::new(
            &algorithm,
            &four.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let mut moved = 0;
        let n = 10_000;
        for k in 0..n {
            let h = hash64(format!("user-{k}").as_bytes());
            let before = pick_all(&b5, 5, &[], Some(h)).unwrap();
            let again = pick_all(&b5, 5, &[], Some(h)).unwrap();
            assert_eq!(before, again, "a key stays on one endpoint");
            let after = pick_all(&b4, 4, &[], Some(h)).unwrap();
            if before != 4 && before != after {
                moved += 1;
            }
        }
        f64::from(moved) / f64::from(n)
    }

    #[test]
    fn consistent_hashing_moves_only_the_leavers_keys() {
        // Keys of endpoints that stay must stay (ring hash exactly; Maglev
        // nearly, by design).
        assert_eq!(
            moved_share(HashRing::RingHash {
                minimum_ring_size: 1024
            }),
            0.0
        );
        let maglev = moved_share(HashRing::Maglev { table_size: 65537 });
        assert!(maglev < 0.05, "maglev moved {maglev}");
    }

    #[test]
    fn hashing_spreads_keys_over_endpoints() {
        for ring in [
            HashRing::RingHash {
                minimum_ring_size: 1024,
            },
            HashRing::Maglev { table_size: 65537 },
        ] {
            let ks = keys(4);
            let b = Balancer::new(
                &Algorithm::ConsistentHash(ConsistentHash {
                    key: HashKey::SourceIp,
                    ring,
                }),
                &ks.iter().map(String::as_str).collect::<Vec<_>>(),
            );
            let mut counts = [0u32; 4];
            for k in 0..8000 {
                counts[pick_all(&b, 4, &[], Some(hash64(format!("k{k}").as_bytes()))).unwrap()] +=
                    1;
            }
            assert!(counts.iter().all(|&c| c > 1200), "{ring:?}: {counts:?}");
        }
    }
}
