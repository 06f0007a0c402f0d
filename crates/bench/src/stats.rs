//! Latency percentiles and throughput figures.

use std::time::Duration;

/// Latency samples in microseconds.
#[derive(Debug, Default, Clone)]
pub struct Latencies(Vec<u64>);

impl Latencies {
    pub fn push(&mut self, d: Duration) {
        self.0.push(d.as_micros() as u64);
    }

    pub fn push_micros(&mut self, us: u64) {
        self.0.push(us);
    }

    pub fn extend(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The `p`-th percentile (0..=100) in milliseconds; `None` without samples.
    pub fn percentile_ms(&mut self, p: f64) -> Option<f64> {
        if self.0.is_empty() {
            return None;
        }
        self.0.sort_unstable();
        let rank = ((p / 100.0) * (self.0.len() - 1) as f64).round() as usize;
        Some(self.0[rank.min(self.0.len() - 1)] as f64 / 1000.0)
    }
}

/// Events per second over `elapsed`.
pub fn rate(count: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        return 0.0;
    }
    count as f64 / elapsed.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let mut l = Latencies::default();
        for us in 1..=100 {
            l.push_micros(us * 1000);
        }
        assert_eq!(l.percentile_ms(50.0), Some(51.0));
        assert_eq!(l.percentile_ms(99.0), Some(99.0));
        assert_eq!(l.percentile_ms(100.0), Some(100.0));
        assert_eq!(Latencies::default().percentile_ms(50.0), None);
        assert_eq!(rate(10, Duration::from_millis(500)), 20.0);
    }
}
