//! How many `@connections` calls one processor keeps in flight: an adaptive limit shared by every
//! record and every room the process is working on.
//!
//! Fan-out is bound by latency: calls a second = calls in flight / latency. From a Lambda in its
//! region a call takes tens of milliseconds, so the account's default quota of 10,000 calls a
//! second needs about 200 in flight at 20 ms and 500 at 50 ms. A fixed number is either too few
//! (the quota is never reached) or too many (every call past the quota answers 429 and is sent
//! again). The limit therefore adapts, as TCP's congestion window does (AIMD):
//!
//! * **Slow start.** From `initial`, the limit grows by one for every call that succeeds while
//!   the window is in use and latency holds: it doubles every round trip, up to `max`.
//! * **Throttled.** A 429 cuts it to 0.7× (at most once per round trip, never below `min`) and
//!   ends slow start; from then on it grows by one per round trip (1/limit per success).
//! * **Latency does not hold.** A call that took more than twice the best recent latency plus
//!   10 ms does not grow the limit: the endpoint, or this process, is saturated.
//!
//! `max` is `ROOMCAST_DELIVERY_CONCURRENCY` (512 by default: a Lambda process has 1,024 file
//! descriptors, and every call in flight holds a connection).
//!
//! It also tells an account's throttling from one slow client. API Gateway answers both with
//! `429 LimitExceededException`: a client whose send buffer is full, and an account over its
//! quota. When 429s come for [`ACCOUNT_THROTTLE_CONNECTIONS`] or more distinct connections within
//! [`ACCOUNT_THROTTLE_WINDOW`], the account is throttling: the deliverer retries, and does not
//! count those 429s against any connection's slow-consumer budget.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};

/// 429s for this many distinct connections within [`ACCOUNT_THROTTLE_WINDOW`] mean the account is
/// throttling, not one client.
pub const ACCOUNT_THROTTLE_CONNECTIONS: usize = 3;
pub const ACCOUNT_THROTTLE_WINDOW: Duration = Duration::from_secs(1);
/// What a cut keeps of the limit.
const CUT: f64 = 0.7;
/// Latency holds while a call takes at most twice the best recent latency plus this.
const LATENCY_SLACK: Duration = Duration::from_millis(10);
/// The best latency is taken over epochs this long, so that it follows a change of regime.
const BEST_EPOCH: Duration = Duration::from_secs(10);

pub struct AdaptiveLimit {
    semaphore: Semaphore,
    min: usize,
    max: usize,
    state: Mutex<State>,
}

struct State {
    limit: f64,
    /// Permits the semaphore is meant to hold (in use or free), net of `debt`.
    permits: usize,
    /// Permits to forget as they come back, after a cut that found too few free.
    debt: usize,
    slow_start: bool,
    /// The best latency of the previous epoch and of this one.
    best: Option<Duration>,
    best_now: Option<Duration>,
    epoch_started: Instant,
    last_cut: Option<Instant>,
    in_flight: usize,
    peak_in_flight: usize,
    /// Recent 429s: when, and a hash of the connection.
    recent_429: VecDeque<(Instant, u64)>,
}

/// How a call made under a [`Slot`] ended.
pub enum Finished<'a> {
    /// Answered (any status but 429): its latency counts.
    Answered,
    /// 429 for this connection.
    Throttled(&'a str),
    /// No answer (timeout, connection error): neither grows nor cuts.
    NoAnswer,
}

/// One call in flight. Dropping it without [`Slot::finish`] counts as [`Finished::NoAnswer`].
pub struct Slot<'a> {
    limit: &'a AdaptiveLimit,
    permit: Option<SemaphorePermit<'a>>,
    started: Instant,
}

impl AdaptiveLimit {
    pub fn new(initial: usize, max: usize) -> AdaptiveLimit {
        let max = max.max(1);
        let initial = initial.clamp(1, max);
        let state = State {
            limit: initial as f64,
            permits: initial,
            debt: 0,
            slow_start: true,
            best: None,
            best_now: None,
            epoch_started: Instant::now(),
            last_cut: None,
            in_flight: 0,
            peak_in_flight: 0,
            recent_429: VecDeque::new(),
        };
        AdaptiveLimit { semaphore: Semaphore::new(initial), min: 1, max, state: Mutex::new(state) }
    }

    /// Waits for room for one more call.
    pub async fn acquire(&self) -> Slot<'_> {
        let permit = self.semaphore.acquire().await.expect("the limit's semaphore is never closed");
        let mut state = self.lock();
        state.in_flight += 1;
        state.peak_in_flight = state.peak_in_flight.max(state.in_flight);
        Slot { limit: self, permit: Some(permit), started: Instant::now() }
    }

    /// The most calls allowed in flight now.
    pub fn current(&self) -> usize {
        self.lock().permits
    }

    /// The most calls that were in flight at once since the process started.
    pub fn peak_in_flight(&self) -> usize {
        self.lock().peak_in_flight
    }

    /// The ceiling the limit grows to.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Whether 429s came for several connections lately: the account, not a client, is throttled.
    pub fn account_throttled(&self) -> bool {
        let mut state = self.lock();
        state.prune_429(Instant::now());
        let mut seen: Vec<u64> = state.recent_429.iter().map(|(_, c)| *c).collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len() >= ACCOUNT_THROTTLE_CONNECTIONS
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the semaphore hold `target` permits.
    fn resize(&self, state: &mut State, target: usize) {
        let target = target.clamp(self.min, self.max);
        if target > state.permits {
            let up = target - state.permits;
            let cancelled = up.min(state.debt);
            state.debt -= cancelled;
            self.semaphore.add_permits(up - cancelled);
        } else if target < state.permits {
            let down = state.permits - target;
            let forgotten = self.semaphore.forget_permits(down);
            state.debt += down - forgotten;
        }
        state.permits = target;
    }

    fn finished(&self, started: Instant, how: Finished<'_>) {
        let now = Instant::now();
        let mut state = self.lock();
        match how {
            Finished::Answered => {
                let latency = now - started;
                if now - state.epoch_started >= BEST_EPOCH {
                    state.best = state.best_now.or(state.best);
                    state.best_now = None;
                    state.epoch_started = now;
                }
                state.best_now = Some(state.best_now.map_or(latency, |b| b.min(latency)));
                let best = state.best.map_or(latency, |b| b.min(latency));
                state.best = Some(best);
                let holds = latency <= best * 2 + LATENCY_SLACK;
                // Grow only a window in use: calls finishing with room to spare say nothing of
                // whether more would be served.
                let in_use = state.in_flight * 2 >= state.permits;
                if holds && in_use && state.permits < self.max {
                    state.limit += if state.slow_start { 1.0 } else { 1.0 / state.limit };
                    state.limit = state.limit.min(self.max as f64);
                    let target = state.limit as usize;
                    self.resize(&mut state, target);
                }
            }
            Finished::Throttled(connection) => {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                connection.hash(&mut hasher);
                state.recent_429.push_back((now, hasher.finish()));
                state.prune_429(now);
                let round_trip = state.best.unwrap_or(Duration::from_millis(5)).max(Duration::from_millis(5));
                if state.last_cut.is_none_or(|at| now - at >= round_trip) {
                    state.slow_start = false;
                    state.last_cut = Some(now);
                    state.limit = (state.limit * CUT).max(self.min as f64);
                    let target = state.limit as usize;
                    self.resize(&mut state, target);
                }
            }
            Finished::NoAnswer => {}
        }
    }

    fn release(&self, permit: SemaphorePermit<'_>) {
        let mut state = self.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        if state.debt > 0 {
            state.debt -= 1;
            permit.forget();
        } else {
            drop(permit);
        }
    }
}

impl State {
    fn prune_429(&mut self, now: Instant) {
        while self.recent_429.front().is_some_and(|(at, _)| now - *at > ACCOUNT_THROTTLE_WINDOW) {
            self.recent_429.pop_front();
        }
        // Enough to tell a few connections from many.
        while self.recent_429.len() > 256 {
            self.recent_429.pop_front();
        }
    }
}

impl Slot<'_> {
    pub fn finish(mut self, how: Finished<'_>) {
        self.limit.finished(self.started, how);
        if let Some(permit) = self.permit.take() {
            self.limit.release(permit);
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.limit.release(permit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn with_demand_it_grows_to_the_max_and_no_further() {
        let limit = std::sync::Arc::new(AdaptiveLimit::new(4, 64));
        // More callers than the max, each making calls of 1 ms one after the other.
        let workers: Vec<_> = (0..100)
            .map(|_| {
                let limit = limit.clone();
                tokio::spawn(async move {
                    for _ in 0..20 {
                        let slot = limit.acquire().await;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        slot.finish(Finished::Answered);
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.await.unwrap();
        }
        assert_eq!(limit.current(), 64);
        assert_eq!(limit.peak_in_flight(), 64);
    }

    #[tokio::test]
    async fn an_idle_window_does_not_grow() {
        let limit = AdaptiveLimit::new(32, 512);
        for _ in 0..100 {
            limit.acquire().await.finish(Finished::Answered);
        }
        assert_eq!(limit.current(), 32, "one call at a time says nothing about 33");
    }

    #[tokio::test]
    async fn a_429_cuts_once_per_round_trip_and_ends_slow_start() {
        let limit = AdaptiveLimit::new(100, 512);
        let slots: Vec<_> = futures::future::join_all((0..100).map(|_| limit.acquire())).await;
        let mut slots = slots.into_iter();
        // Three 429s in the same round trip: one cut.
        for _ in 0..3 {
            slots.next().unwrap().finish(Finished::Throttled("a"));
        }
        assert_eq!(limit.current(), 70);
        // The rest succeed: congestion avoidance grows by about one per window, not one per call.
        for slot in slots {
            slot.finish(Finished::Answered);
        }
        assert!((70..=72).contains(&limit.current()), "{}", limit.current());
    }

    #[tokio::test]
    async fn a_cut_below_the_calls_in_flight_takes_effect_as_they_come_back() {
        let limit = AdaptiveLimit::new(10, 512);
        let slots: Vec<_> = futures::future::join_all((0..10).map(|_| limit.acquire())).await;
        let mut slots = slots.into_iter();
        slots.next().unwrap().finish(Finished::Throttled("a"));
        assert_eq!(limit.current(), 7);
        // Nine still out, seven allowed: the first two back are forgotten, the rest free again.
        for slot in slots {
            slot.finish(Finished::NoAnswer);
        }
        let held: Vec<_> = futures::future::join_all((0..7).map(|_| limit.acquire())).await;
        let eighth = tokio::time::timeout(Duration::from_millis(50), limit.acquire()).await;
        assert!(eighth.is_err(), "an eighth call got room under a limit of seven");
        drop(held);
    }

    #[tokio::test]
    async fn several_connections_throttled_is_the_account_one_is_a_client() {
        let limit = AdaptiveLimit::new(10, 512);
        limit.acquire().await.finish(Finished::Throttled("slow"));
        limit.acquire().await.finish(Finished::Throttled("slow"));
        assert!(!limit.account_throttled(), "one client's full buffer");
        limit.acquire().await.finish(Finished::Throttled("b"));
        assert!(!limit.account_throttled(), "two connections");
        limit.acquire().await.finish(Finished::Throttled("c"));
        assert!(limit.account_throttled());
    }
}
