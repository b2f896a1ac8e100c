//! A token bucket in bytes: the bandwidth limit of one copy path.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    level: f64,
    at: Duration,
}

impl TokenBucket {
    /// `rate` bytes per second, holding at most `burst` bytes of credit (at least one
    /// copy's worth, or a copy larger than the burst could never go).
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            level: burst,
            at: Duration::ZERO,
        }
    }

    /// Takes `bytes` of credit at time `now` if there is that much.
    pub fn take(&mut self, bytes: u64, now: Duration) -> bool {
        let elapsed = now.saturating_sub(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.level = (self.level + elapsed * self.rate).min(self.burst);
        let need = bytes as f64;
        if self.level >= need {
            self.level -= need;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refills_at_its_rate_up_to_its_burst() {
        let ms = Duration::from_millis;
        let mut b = TokenBucket::new(1000.0, 500.0);
        assert!(b.take(500, ms(0)));
        assert!(!b.take(1, ms(0)), "empty");
        assert!(!b.take(200, ms(100)), "100 ms refill 100 bytes");
        assert!(b.take(200, ms(200)));
        // A long idle spell refills to the burst, not beyond.
        assert!(b.take(500, ms(10_000)));
        assert!(!b.take(1, ms(10_000)));
    }
}
