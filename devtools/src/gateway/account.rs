//! What API Gateway's `@connections` imposes that loopback does not: a call's latency and the
//! account's quota. `roomcast dev --management-latency 20ms --management-quota 10000` and the
//! tests' `@connections` recorder answer through it, so fan-out is measured and tested as it runs
//! from a Lambda in its region instead of at loopback's 0.1 ms.
//!
//! * **Latency.** Every answer (success, 410, 429 alike) comes after `latency`, plus up to
//!   `jitter` more, uniformly.
//! * **The account's quota.** A token bucket of `quota` calls a second holding at most `burst`
//!   (API Gateway's defaults: 10,000 a second, burst 5,000, shared by every API of the account
//!   and region). A call that finds it empty is answered `429 LimitExceededException` — the same
//!   answer as a client's full send buffer, as in AWS — and counted as throttled.
//!
//! It also counts what it saw: calls answered, throttled, and the most in flight at once, which
//! is how a test sees that a caller adapts its concurrency.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// API Gateway's default account quota, calls a second, and its burst.
pub const DEFAULT_QUOTA: f64 = 10_000.0;
pub const DEFAULT_BURST: f64 = 5_000.0;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AccountSettings {
    pub latency: Duration,
    pub jitter: Duration,
    /// Calls a second; `None`: no quota.
    pub quota: Option<f64>,
    pub burst: f64,
}

impl Default for AccountSettings {
    /// Loopback: no latency, no quota.
    fn default() -> Self {
        AccountSettings { latency: Duration::ZERO, jitter: Duration::ZERO, quota: None, burst: DEFAULT_BURST }
    }
}

impl AccountSettings {
    pub fn with_quota(self, quota: f64, burst: f64) -> AccountSettings {
        AccountSettings { quota: Some(quota), burst, ..self }
    }
}

/// The account, as one `@connections` endpoint sees it.
pub struct Account {
    settings: Mutex<AccountSettings>,
    bucket: Mutex<(f64, Instant)>,
    answered: AtomicU64,
    throttled: AtomicU64,
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
}

/// A call being answered; dropping it ends the call.
pub struct Call<'a> {
    account: &'a Account,
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        self.account.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Account {
    pub fn new(settings: AccountSettings) -> Account {
        Account {
            bucket: Mutex::new((settings.burst, Instant::now())),
            settings: Mutex::new(settings),
            answered: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            peak_in_flight: AtomicUsize::new(0),
        }
    }

    /// Admits one call: `Err` when the account is over its quota (answer 429). The call is in
    /// flight until the returned guard is dropped; [`Account::delay`] is its latency.
    pub fn admit(&self) -> (Call<'_>, Result<(), Throttled>) {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        let call = Call { account: self };
        let AccountSettings { quota, burst, .. } = self.settings();
        let Some(rate) = quota else {
            self.answered.fetch_add(1, Ordering::Relaxed);
            return (call, Ok(()));
        };
        let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = &mut *bucket;
        let elapsed = last.elapsed().as_secs_f64();
        *last = Instant::now();
        *tokens = (*tokens + elapsed * rate).min(burst.max(1.0));
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            self.answered.fetch_add(1, Ordering::Relaxed);
            (call, Ok(()))
        } else {
            self.throttled.fetch_add(1, Ordering::Relaxed);
            (call, Err(Throttled))
        }
    }

    pub fn settings(&self) -> AccountSettings {
        *self.settings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the quota from now on (`None`: no quota); the bucket starts full.
    pub fn set_quota(&self, quota: Option<f64>, burst: f64) {
        let mut settings = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        settings.quota = quota;
        settings.burst = burst;
        *self.bucket.lock().unwrap_or_else(|p| p.into_inner()) = (burst, Instant::now());
    }

    /// Starts counting afresh, with an empty bucket: from now on the account admits its quota
    /// a second and no burst (the bench's physical limit is then the quota itself).
    pub fn reset(&self) {
        *self.bucket.lock().unwrap_or_else(|p| p.into_inner()) = (0.0, Instant::now());
        self.answered.store(0, Ordering::Relaxed);
        self.throttled.store(0, Ordering::Relaxed);
        self.peak_in_flight.store(self.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Waits one call's latency.
    pub async fn delay(&self) {
        let AccountSettings { latency, jitter, .. } = self.settings();
        let wait = latency + jitter.mul_f64(fastrand::f64());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Calls admitted within the quota.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Calls answered 429 for the quota.
    pub fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }

    /// The most calls in flight at once.
    pub fn peak_in_flight(&self) -> usize {
        self.peak_in_flight.load(Ordering::SeqCst)
    }
}

/// The account is over its quota.
#[derive(Debug)]
pub struct Throttled;

/// Reads `20ms`, `1.5s` or a plain number of milliseconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else {
        (text, 0.001)
    };
    match number.trim().parse::<f64>() {
        Ok(n) if n >= 0.0 && n.is_finite() && n * scale <= 60.0 => Ok(Duration::from_secs_f64(n * scale)),
        _ => Err(format!("{text:?} is not a duration such as 20ms or 1.5s (at most 60 s)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_admits_its_burst_then_its_rate() {
        let account = Account::new(AccountSettings::default().with_quota(10.0, 10.0));
        let admitted = (0..50).filter(|_| account.admit().1.is_ok()).count();
        // The burst, and one more if the loop took over 100 ms.
        assert!((10..=11).contains(&admitted), "{admitted}");
        assert_eq!(account.throttled() as usize, 50 - admitted);
        std::thread::sleep(Duration::from_millis(300));
        let later = (0..50).filter(|_| account.admit().1.is_ok()).count();
        assert!((2..=5).contains(&later), "10 a second for 0.3 s: {later}");
    }

    #[test]
    fn no_quota_admits_everything_and_counts_in_flight() {
        let account = Account::new(AccountSettings::default());
        let calls: Vec<_> = (0..5).map(|_| account.admit()).collect();
        assert!(calls.iter().all(|(_, r)| r.is_ok()));
        drop(calls);
        let _one = account.admit();
        assert_eq!(account.peak_in_flight(), 5);
    }

    #[test]
    fn durations_read_as_an_operator_writes_them() {
        assert_eq!(parse_duration("20ms"), Ok(Duration::from_millis(20)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_millis(7)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-1ms").is_err());
    }
}
