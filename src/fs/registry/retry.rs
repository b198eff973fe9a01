//! Retry policy: bounded attempts, jittered exponential backoff, and
//! `Retry-After` (delta-seconds or HTTP-date) honoured up to a cap. The
//! caller loops and awaits `tokio::time::sleep`; nothing here blocks or
//! recurses.

use std::time::{Duration, SystemTime};

use super::config::RegistryConfig;

/// Backoff settings taken from [`RegistryConfig`].
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts, first included.
    pub max_attempts: u32,
    base: Duration,
    max: Duration,
    retry_after_cap: Duration,
}

impl RetryPolicy {
    /// From the client configuration.
    pub fn from_config(c: &RegistryConfig) -> Self {
        Self {
            max_attempts: c.max_attempts,
            base: Duration::from_millis(c.backoff_base_ms),
            max: Duration::from_millis(c.backoff_max_ms),
            retry_after_cap: Duration::from_millis(c.retry_after_cap_ms),
        }
    }

    /// Delay before attempt `attempt + 1` (`attempt` counts from 1): a
    /// uniformly jittered value in `[d/2, d]` with `d = base * 2^(attempt-1)`
    /// capped at `max`; a server's `Retry-After` wins when longer, up to the
    /// cap.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max);
        let half = exp / 2;
        let span = u64::try_from((exp - half).as_micros()).unwrap_or(u64::MAX);
        let jittered = half + Duration::from_micros(fastrand::u64(0..=span));
        match retry_after {
            Some(ra) => jittered.max(ra.min(self.retry_after_cap)),
            None => jittered,
        }
    }
}

/// Parses `Retry-After`: delta-seconds or an HTTP-date (relative to `now`).
pub fn parse_retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_jittered_and_capped() {
        let p = RetryPolicy::from_config(&RegistryConfig {
            backoff_base_ms: 100,
            backoff_max_ms: 1000,
            retry_after_cap_ms: 5000,
            ..RegistryConfig::default()
        });
        for _ in 0..50 {
            let d1 = p.delay(1, None);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d3 = p.delay(3, None);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            assert!(p.delay(30, None) <= Duration::from_millis(1000));
        }
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3600))),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn retry_after_seconds_and_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        // 784111777 is Sun, 06 Nov 1994 08:49:37 GMT.
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:40 GMT", now),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
