//! A token bucket: how long a reader must wait before it may take `n` more bytes so that the
//! long-run rate stays at `rate` bytes per second. Time is passed in, so it is tested directly.
use std::time::{Duration, Instant};

/// The smallest burst: one TCP receive window's worth, so a slow rate still moves whole chunks.
pub const MIN_BURST: u64 = 64 * 1024;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    /// Tokens available at `at`; negative when readers are ahead (they wait it off).
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// `rate` in bytes per second (at least 1). The burst is 50 ms of traffic (at least
    /// [`MIN_BURST`]): small enough that the rate holds over a second, large enough that a
    /// reader is not woken for every packet.
    pub fn new(rate: u64, now: Instant) -> TokenBucket {
        let rate = rate.max(1) as f64;
        let burst = (rate / 20.0).max(MIN_BURST as f64);
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    /// Takes `n` bytes' worth of tokens at `now`; returns how long the caller must wait before
    /// using them (zero when tokens were there). Taking is never refused: a chunk that has
    /// already arrived is paid for by waiting, and later takers queue behind it.
    pub fn take(&mut self, n: u64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_burst_passes_then_readers_wait_for_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1_000_000, t0);
        // 64 KiB of burst (50 ms at 1 MB/s is less than MIN_BURST).
        assert_eq!(b.take(65_536, t0), Duration::ZERO);
        // The next 100 kB must wait 100 ms.
        let w = b.take(100_000, t0);
        assert!((w.as_secs_f64() - 0.1).abs() < 1e-6, "{w:?}");
        // A second taker queues behind the first: 200 ms.
        let w = b.take(100_000, t0);
        assert!((w.as_secs_f64() - 0.2).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn idle_time_refills_only_up_to_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1_000_000, t0);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.take(65_536, later), Duration::ZERO);
        assert!(b.take(1, later) > Duration::ZERO);
    }

    proptest! {
        /// Whatever the chunk sizes and arrival times, a reader that waits as told never gets
        /// more than rate × time + burst bytes.
        #[test]
        fn waiting_as_told_keeps_the_rate(
            rate in 10_000u64..100_000_000,
            chunks in proptest::collection::vec((1u64..2_000_000, 0u64..50_000), 1..200),
        ) {
            let t0 = Instant::now();
            let mut b = TokenBucket::new(rate, t0);
            let burst = (rate as f64 / 20.0).max(MIN_BURST as f64);
            let mut now = t0;
            let mut taken = 0u64;
            for (n, gap_us) in chunks {
                now += Duration::from_micros(gap_us);
                let w = b.take(n, now);
                now += w;
                taken += n;
                let allowed = rate as f64 * now.duration_since(t0).as_secs_f64() + burst;
                prop_assert!(taken as f64 <= allowed + 1.0, "{taken} > {allowed}");
            }
        }
    }
}
