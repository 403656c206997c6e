//! What the two load clients (`grpc-load`, `http-load`) share: the open-loop pacer and the
//! latency summary they print.

use std::time::{Duration, Instant};

/// The pacer: a thread that sleeps until each call is due (`nanosleep`: tens of µs late at
/// most, where tokio's timer wheel rounds to the millisecond and would send bursts) and hands
/// the due time to the call's stream (call k goes to stream k mod N). Dropping the senders at
/// `end` ends the streams.
pub fn pace(
    streams: Vec<tokio::sync::mpsc::UnboundedSender<Instant>>,
    start: Instant,
    rate: f64,
    end: Instant,
) {
    std::thread::spawn(move || {
        let n = streams.len() as u64;
        for k in 0u64.. {
            let due = start + Duration::from_secs_f64(k as f64 / rate);
            if due >= end {
                break;
            }
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if streams[(k % n) as usize].send(due).is_err() {
                break;
            }
        }
    });
}

/// p50, p99 and mean of latencies in nanoseconds, in µs (0 for none).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub p50_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
}

impl Summary {
    /// Sorts `latencies_ns` (nearest-rank percentiles).
    pub fn of(latencies_ns: &mut [u64]) -> Self {
        latencies_ns.sort_unstable();
        let lat = &*latencies_ns;
        let pct = |p: f64| -> f64 {
            if lat.is_empty() {
                return 0.0;
            }
            let rank = ((p / 100.0) * lat.len() as f64).ceil() as usize;
            lat[rank.clamp(1, lat.len()) - 1] as f64 / 1000.0
        };
        let mean_us = if lat.is_empty() {
            0.0
        } else {
            lat.iter().sum::<u64>() as f64 / lat.len() as f64 / 1000.0
        };
        Self {
            p50_us: pct(50.0),
            p99_us: pct(99.0),
            mean_us,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles_and_mean() {
        let mut lat: Vec<u64> = (1..=100).rev().map(|i| i * 1000).collect();
        let s = Summary::of(&mut lat);
        assert_eq!((s.p50_us, s.p99_us, s.mean_us), (50.0, 99.0, 50.5));
        assert_eq!(Summary::of(&mut []).p99_us, 0.0);
    }
}
